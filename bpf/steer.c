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
//
// Entries end with their connections: steer_egress (tc egress of the same link) sees the
// service's side, so together the programs see both FINs and the last ACK, or a RST, and
// delete the entry then. A PARK entry is never deleted here: a migration owns it. A SYN
// with a new sequence number on an entry that has carried traffic is a new connection
// reusing the 4-tuple: the old entry goes, and the SYN is routed as any new one.
// BCC rewrites map calls only in this file, so the logic lives here, not in a header.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "pysteer_maps.h"
#include "pysteer_parse.h"

#define E2BIG 7

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

/* Track one segment of a flow in the table, in direction `d` (0: client -> service,
 * 1: back; always a constant, so the indexing is static). Returns 1 when the connection
 * has ended: a RST at its sender's next sequence number (what the receiving kernel
 * accepts), or a segment without FIN that ACKs the other side's FIN after both were sent
 * (the last ACK, from the side that closed first). */
static __always_inline int track(struct flow_stats *c, const int d, struct tcp_seg *seg)
{
	const int o = 1 - d;
	__u8 mine = c->flags[d];
	__u8 theirs = c->flags[o];
	c->last_ns = bpf_ktime_get_ns();
	if (seg->rst)
		return (mine & F_NXT) && seg->seq == c->nxt[d];
	if (!(mine & F_NXT) || (__s32)(seg->end - c->nxt[d]) > 0) {
		c->nxt[d] = seg->end;
		mine |= F_NXT;
	}
	if (d == 0 && seg->syn && !seg->ack) {
		c->syn_seq = seg->seq;
		mine |= F_SYN;
	}
	int ended = 0;
	if (seg->fin) {
		c->fin_end[d] = seg->end;
		mine |= F_FIN;
	} else if ((mine & F_FIN) && (theirs & F_FIN) && seg->ack && seg->ack_seq == c->fin_end[o]) {
		ended = 1;
	}
	c->flags[d] = mine;
	return ended;
}

/* The connection of `key` is over: its entry and counters go. */
static __always_inline void ended(struct flow_key *key, struct tcp_seg *seg)
{
	flows.delete(key);
	flow_stats.delete(key);
	stat_add(seg->rst ? STAT_CLOSED_RST : STAT_CLOSED_FIN);
}

/* `xdp`: called from XDP, where a packet larger than the target link's MTU (a GSO
 * super-packet, on veth) cannot be redirected: it goes up to the tc program instead. */
static __always_inline int steer_decide(void *data, void *data_end, u32 len,
					struct park_meta *meta, u32 *ifindex, int xdp)
{
	stat_add(STAT_SEEN);
	void *ip = parse_flow(data, data_end, &meta->key);
	struct tcp_seg seg = {};
	if (!ip || !parse_seg(ip, data_end, meta->key.family, len, &seg)) {
		stat_add(STAT_PASS);
		return V_PASS;
	}
	int opening = seg.syn && !seg.ack;
	struct flow_action *v = flows.lookup(&meta->key);
	if (v && opening && v->action != ACTION_PARK) {
		/* A SYN on an entry that has carried another connection (counters exist, and
		 * not for this SYN): the old connection is gone, this one starts afresh. An
		 * entry with no counters yet was put there for this very connection. */
		struct flow_stats *old = flow_stats.lookup(&meta->key);
		if (old && !((old->flags[0] & F_SYN) && old->syn_seq == seg.seq)) {
			flows.delete(&meta->key);
			flow_stats.delete(&meta->key);
			stat_add(STAT_STALE_SYN);
			v = NULL;
		}
	}
	if (!v && opening) {
		/* A new connection to a diverted service: it belongs to the divert host from its
		 * first packet on, so the flow is entered as TO(host) for the packets that follow. */
		struct service_key svc = {.family = meta->key.family};
#pragma unroll
		for (int i = 0; i < 4; i++)
			svc.addr[i] = meta->key.daddr[i];
		u32 *divert = new_flows.lookup(&svc);
		if (divert) {
			struct flow_action to = {.action = ACTION_TO, .host = *divert};
			int rc = flows.insert(&meta->key, &to);
			v = flows.lookup(&meta->key);
			if (v)
				stat_add(STAT_NEW_DIVERTED);
			else if (rc == -E2BIG)
				stat_add(STAT_DIVERT_FAILED); /* the table is full: it goes its usual way */
		}
	}
	if (!v) {
		stat_add(STAT_PASS);
		return V_PASS;
	}
	struct flow_stats zero = {};
	struct flow_stats *c = flow_stats.lookup_or_try_init(&meta->key, &zero);
	if (!c)
		stat_add(STAT_STATS_FULL);
	if (v->action == ACTION_PASS) {
		stat_add(STAT_PASS);
		if (c) {
			count(c, len, ACTION_PASS);
			if (track(c, 0, &seg))
				ended(&meta->key, &seg);
		}
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
		track(c, 0, &seg); /* a migration owns the entry: it is never deleted here */
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
		return V_FALLBACK; /* tracked by steer_tc, which sees it next */
	}
	if (!decrement_ttl(ip, data_end, meta->key.family)) {
		stat_add(STAT_DROP_TTL);
		return V_DROP;
	}
	if (!rewrite_macs(data, data_end, host))
		return V_DROP;
	if (c) {
		count(c, len, ACTION_TO);
		if (track(c, 0, &seg))
			ended(&meta->key, &seg); /* this last packet still goes to its host */
	}
	stat_add(STAT_REDIRECTED);
	*ifindex = host->ifindex;
	return V_REDIRECT;
}

static __always_inline int pull_headers(struct __sk_buff *skb)
{
	u32 need = sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct tcphdr);
	if ((void *)(long)skb->data + need > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, need);
	return 0;
}

int steer_tc(struct __sk_buff *skb)
{
	pull_headers(skb);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
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

/* tc egress of the client-facing link: the service's side of each flow in the table, for
 * connection tracking only (it never changes a packet). */
int steer_egress(struct __sk_buff *skb)
{
	pull_headers(skb);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct flow_key key = {};
	void *ip = parse_flow(data, data_end, &key);
	struct tcp_seg seg = {};
	if (!ip || !parse_seg(ip, data_end, key.family, skb->len, &seg))
		return TC_ACT_OK;
	reverse_key(&key);
	struct flow_action *v = flows.lookup(&key);
	if (!v)
		return TC_ACT_OK;
	struct flow_stats zero = {};
	struct flow_stats *c = flow_stats.lookup_or_try_init(&key, &zero);
	if (!c) {
		stat_add(STAT_STATS_FULL);
		return TC_ACT_OK;
	}
	if (track(c, 1, &seg) && v->action != ACTION_PARK)
		ended(&key, &seg);
	return TC_ACT_OK;
}
