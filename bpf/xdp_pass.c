// SPDX-License-Identifier: GPL-2.0
// The pass-through XDP program that the native XDP modes attach to each host-facing
// interface of the steering node, as the kernel's xdp_redirect samples do. Most NIC drivers
// (virtio-net, ixgbe, i40e and others) transmit frames that XDP redirects to them only when
// they run an XDP program of their own. Without one, every redirected frame is lost.
// On a veth the program that counts is the one on the peer (see docs/tuning.md).
// It passes every frame, so it changes nothing on the wire.
#include <uapi/linux/bpf.h>

int pysteer_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
