// SPDX-License-Identifier: GPL-2.0
// pysteer's steering programs for the client-facing link of the steering node: one
// decision (below), two hooks. steer_tc runs on tc clsact ingress (direct-action), the
// best default on veth; steer_xdp runs as XDP, best on real NICs. In the XDP modes the
// loader attaches steer_tc too, as the fallback for what XDP cannot redirect: packets
// larger than the target's MTU (GSO super-packets on veth) are passed up to it.
//   PASS      route normally
//   PARK      hand the packet to userspace (perf buffer, numbered per flow) and drop it
//   TO(host)  rewrite the MACs, decrement the TTL, redirect to the host's link
// A flow not in the table is routed normally, unless it is a new connection (SYN) to a
// service diverted to a host (new_flows: a drain): then it is entered as TO(host).
// BCC rewrites map calls only in this file, so the logic lives here, not in a header.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "pysteer_maps.h"
#include "pysteer_parse.h"

static __always_inline void stat_add(u32 index)
{
	u64 *v = stats.lookup(&index);
	if (v)
		*v += 1;
}

enum verdict { V_PASS, V_PARK, V_REDIRECT, V_DROP, V_FALLBACK };

static __always_inline void count(struct flow_stats *v, u32 len, int action)
{
	if (action == ACTION_PASS) {
		__sync_fetch_and_add(&v->packets[0], 1);
		__sync_fetch_and_add(&v->bytes[0], len);
	} else if (action == ACTION_PARK) {
		__sync_fetch_and_add(&v->packets[1], 1);
		__sync_fetch_and_add(&v->bytes[1], len);
	} else {
		__sync_fetch_and_add(&v->packets[2], 1);
		__sync_fetch_and_add(&v->bytes[2], len);
	}
}

/* `xdp`: called from XDP, where a packet larger than the target link's MTU (a GSO
 * super-packet, on veth) cannot be redirected: it goes up to the tc program instead. */
static __always_inline int steer_decide(void *data, void *data_end, u32 len,
					struct park_meta *meta, u32 *ifindex, int xdp)
{
	stat_add(STAT_SEEN);
	void *ip = parse_flow(data, data_end, &meta->key);
	if (!ip) {
		stat_add(STAT_PASS);
		return V_PASS;
	}
	struct flow_action *v = flows.lookup(&meta->key);
	if (!v && is_syn(ip, data_end, meta->key.family)) {
		/* A new connection to a diverted service: it belongs to the divert host from its
		 * first packet on, so the flow is entered as TO(host) for the packets that follow. */
		struct service_key svc = {.family = meta->key.family};
#pragma unroll
		for (int i = 0; i < 4; i++)
			svc.addr[i] = meta->key.daddr[i];
		u32 *divert = new_flows.lookup(&svc);
		if (divert) {
			struct flow_action to = {.action = ACTION_TO, .host = *divert};
			flows.insert(&meta->key, &to);
			v = flows.lookup(&meta->key);
			if (v)
				stat_add(STAT_NEW_DIVERTED);
		}
	}
	if (!v) {
		stat_add(STAT_PASS);
		return V_PASS;
	}
	struct flow_stats zero = {};
	struct flow_stats *c = flow_stats.lookup_or_try_init(&meta->key, &zero);
	if (v->action == ACTION_PASS) {
		if (c)
			count(c, len, ACTION_PASS);
		stat_add(STAT_PASS);
		return V_PASS;
	}
	if (v->action == ACTION_PARK) {
		if (!c) { /* no room for its counters: cannot number it, so cannot park it */
			stat_add(STAT_DROP_PARK_FULL);
			return V_DROP;
		}
		meta->seq = __sync_fetch_and_add(&c->park_seq, 1);
		meta->len = len;
		count(c, len, ACTION_PARK);
		stat_add(STAT_PARKED);
		return V_PARK;
	}
	u32 h = v->host;
	struct host_entry *host = hosts.lookup(&h);
	if (!host || !host->ifindex) {
		stat_add(STAT_DROP_NO_HOST);
		return V_DROP;
	}
	if (xdp && host->mtu && len > host->mtu + sizeof(struct ethhdr)) {
		stat_add(STAT_XDP_FALLBACK);
		return V_FALLBACK;
	}
	if (!decrement_ttl(ip, data_end, meta->key.family)) {
		stat_add(STAT_DROP_TTL);
		return V_DROP;
	}
	if (!rewrite_macs(data, data_end, host))
		return V_DROP;
	if (c)
		count(c, len, ACTION_TO);
	stat_add(STAT_REDIRECTED);
	*ifindex = host->ifindex;
	return V_REDIRECT;
}


int steer_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr) > data_end) {
		bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr));
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct park_meta meta = {};
	u32 ifindex = 0;
	/* if/else, not switch: clang may emit a jump table, which BPF cannot run */
	int verdict = steer_decide(data, data_end, skb->len, &meta, &ifindex, 0);
	if (verdict == V_PARK) {
		/* BCC rewrites this call into a statement: keep it one. */
		int rc = parked.perf_submit_skb(skb, skb->len, &meta, sizeof(meta));
		if (rc < 0)
			stat_add(STAT_DROP_PARK_FULL);
		return TC_ACT_SHOT;
	}
	if (verdict == V_REDIRECT)
		return bpf_redirect(ifindex, 0);
	if (verdict == V_DROP)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

int steer_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct park_meta meta = {};
	u32 ifindex = 0;
	u32 len = data_end - data;
	/* if/else, not switch: clang may emit a jump table, which BPF cannot run */
	int verdict = steer_decide(data, data_end, len, &meta, &ifindex, 1);
	if (verdict == V_PARK) {
		/* BCC rewrites this call into a statement: keep it one. */
		int rc = parked.perf_submit_skb(ctx, len, &meta, sizeof(meta));
		if (rc < 0)
			stat_add(STAT_DROP_PARK_FULL);
		return XDP_DROP;
	}
	if (verdict == V_REDIRECT)
		return bpf_redirect(ifindex, 0);
	if (verdict == V_DROP)
		return XDP_DROP;
	return XDP_PASS; /* V_PASS, and V_FALLBACK: steer_tc handles it on tc ingress */
}
