// SPDX-License-Identifier: GPL-2.0
// The guard, on tc ingress of a host: a packet of a flow frozen on this host (being moved
// away or in) is dropped and counted, so the host's kernel never answers it with a RST.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "pysteer_guard_maps.h"
#include "pysteer_parse.h"

int guard_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct flow_key key = {};
	if (!parse_flow(data, data_end, &key))
		return TC_ACT_OK;
	u64 *dropped = frozen.lookup(&key);
	if (!dropped)
		return TC_ACT_OK;
	__sync_fetch_and_add(dropped, 1);
	u32 index = STAT_GUARD_DROPPED;
	u64 *v = guard_stats.lookup(&index);
	if (v)
		*v += 1;
	return TC_ACT_SHOT;
}
