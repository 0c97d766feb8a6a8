// SPDX-License-Identifier: GPL-2.0
// Trivial XDP and tc programs that `pysteer doctor` compiles with BCC and attaches to a
// throw-away veth, to prove the toolchain (BCC, kernel headers, bpf(), clsact, XDP) works.
// Both pass every packet and count it, so attaching them changes nothing on the wire.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(doctor_seen, u64, 1);

static __always_inline void count(void)
{
	u32 key = 0;
	u64 *v = doctor_seen.lookup(&key);
	if (v)
		__sync_fetch_and_add(v, 1);
}

int doctor_xdp(struct xdp_md *ctx)
{
	count();
	return XDP_PASS;
}

int doctor_tc(struct __sk_buff *skb)
{
	count();
	return TC_ACT_OK;
}
