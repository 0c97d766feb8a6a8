// SPDX-License-Identifier: GPL-2.0
// What becomes of the frames XDP redirects, seen from the kernel's xdp tracepoints. They are
// attached as raw tracepoints, which need no tracefs. Kprobes are not used.
//   xdp_redirect_err  a redirect refused at once: the target takes no XDP frames
//                     (EOPNOTSUPP, Linux >= 6.3, when it has no XDP program, or, on a veth,
//                     when its peer has neither an XDP program nor GRO), is down or gone,
//                     or the frame is too large
//   xdp_devmap_xmit   a bulk of frames handed to the target's driver (ndo_xdp_xmit): how
//                     many it took and how many it dropped (before 6.3, a driver without
//                     an XDP program refused them here, with ENXIO)
// Both are counted per link (network namespace, receiving interface, target interface),
// for the links userspace lists in `links` only. Ifindexes are per namespace and a
// tracepoint sees every namespace, so the namespace's cookie is part of the key.
//
// pysteer_probe is the self-test's probe: it redirects every frame to `probe_target`. It is
// never attached. BPF_PROG_TEST_RUN runs it on live frames (see xdp_selftest.py).
//
// OFF_IFINDEX, OFF_ND_NET and OFF_NET_COOKIE are the offsets of net_device.ifindex,
// net_device.nd_net.net and net.net_cookie. The loader reads them from the running
// kernel's BTF, because the headers BCC compiles against may be those of another kernel.
#include <uapi/linux/bpf.h>

#ifndef INT_MAX
#define INT_MAX 0x7fffffff
#endif

struct link_key {
	__u64 netns; /* the namespace's cookie (SO_NETNS_COOKIE) */
	__u32 from;  /* ifindex of the receiving interface */
	__u32 to;    /* ifindex of the target */
};

struct link_count {
	__u64 sent;     /* frames the target's driver took (xdp_devmap_xmit) */
	__u64 dropped;  /* frames the target's driver dropped (xdp_devmap_xmit) */
	__u64 refused;  /* redirects that failed at once (xdp_redirect_err) */
	__s32 last_err; /* the last failure's errno (negative); 0: none yet */
	__u32 pad;
};

BPF_HASH(links, struct link_key, struct link_count, 256);
BPF_ARRAY(probe_target, u32, 1);

/* The ifindex of `dev` and its namespace's cookie; 0 on success. */
static __always_inline int dev_id(const char *dev, __u32 *ifindex, __u64 *netns)
{
	const char *net = NULL;
	if (!dev || bpf_probe_read_kernel(ifindex, sizeof(*ifindex), dev + OFF_IFINDEX))
		return -1;
	if (bpf_probe_read_kernel(&net, sizeof(net), dev + OFF_ND_NET) || !net)
		return -1;
	return bpf_probe_read_kernel(netns, sizeof(*netns), net + OFF_NET_COOKIE);
}

/* TP_PROTO(from_dev, to_dev, int sent, int drops, int err) */
RAW_TRACEPOINT_PROBE(xdp_devmap_xmit)
{
	struct link_key key = {};
	__u64 to_netns = 0;
	if (dev_id((const char *)ctx->args[0], &key.from, &key.netns) ||
	    dev_id((const char *)ctx->args[1], &key.to, &to_netns))
		return 0;
	struct link_count *c = links.lookup(&key);
	if (!c)
		return 0;
	int sent = (int)ctx->args[2], drops = (int)ctx->args[3], err = (int)ctx->args[4];
	if (sent > 0)
		__sync_fetch_and_add(&c->sent, sent);
	if (drops > 0) {
		__sync_fetch_and_add(&c->dropped, drops);
		c->last_err = err;
	}
	return 0;
}

/* TP_PROTO(dev, xdp, tgt, int err, enum bpf_map_type map_type, u32 map_id, u32 index):
 * for bpf_redirect(ifindex) map_type is 0 (UNSPEC), map_id INT_MAX, index the ifindex. */
RAW_TRACEPOINT_PROBE(xdp_redirect_err)
{
	if ((u32)ctx->args[4] != 0 || (u32)ctx->args[5] != INT_MAX)
		return 0; /* a redirect through a map: not pysteer's */
	struct link_key key = {.to = (u32)ctx->args[6]};
	if (dev_id((const char *)ctx->args[0], &key.from, &key.netns))
		return 0;
	struct link_count *c = links.lookup(&key);
	if (!c)
		return 0;
	__sync_fetch_and_add(&c->refused, 1);
	c->last_err = (int)ctx->args[3];
	return 0;
}

int pysteer_probe(struct xdp_md *ctx)
{
	u32 zero = 0;
	u32 *to = probe_target.lookup(&zero);
	if (!to || !*to)
		return XDP_ABORTED;
	return bpf_redirect(*to, 0);
}
