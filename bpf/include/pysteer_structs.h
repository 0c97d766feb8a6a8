/* SPDX-License-Identifier: GPL-2.0 */
/* Structures shared by pysteer's BPF programs and its Python side (pysteer/steer/maps.py
 * mirrors them with ctypes; keep the two in step). Only stable UAPI types are used. */
#ifndef PYSTEER_STRUCTS_H
#define PYSTEER_STRUCTS_H

/* A TCP or UDP 5-tuple as the steering node sees it: client -> service. Addresses are
 * in network order; IPv4 uses the first word. */
struct flow_key {
	__u8 family;   /* 4 or 6 */
	__u8 proto;    /* IPPROTO_TCP */
	__be16 sport;
	__be16 dport;
	__u16 pad;
	__be32 saddr[4];
	__be32 daddr[4];
};

enum flow_action_kind {
	ACTION_PASS = 0, /* normal routing */
	ACTION_PARK = 1, /* hand every packet to userspace, in order, and drop it here */
	ACTION_TO = 2,   /* redirect to host `host` */
};

/* What to do with a flow: written by userspace only. */
struct flow_action {
	__u32 action;
	__u32 host;
};

/* A flow's counters: written by the programs only (userspace never writes them back,
 * so a park sequence number can never be rewound by a read-modify-write). */
struct flow_stats {
	__u64 park_seq;      /* packets parked so far: each carries its number */
	__u64 packets[3];    /* per action */
	__u64 bytes[3];
};

/* Where TO(host) sends a packet: out of `ifindex` with these MACs. */
struct host_entry {
	__u32 ifindex;
	__u8 dmac[6];
	__u8 smac[6];
	__u32 mtu; /* the link's MTU: XDP hands larger (GSO) packets to the tc fallback */
};

/* A service address (a VIP): new connections to it can be sent to one host (a drain). */
struct service_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__be32 addr[4];
};

/* What a parked packet carries to userspace ahead of its bytes. */
struct park_meta {
	struct flow_key key;
	__u64 seq;
	__u32 len;
	__u32 pad;
};

/* Global counters (per CPU): index into `stats`. */
enum stat_index {
	STAT_SEEN = 0,
	STAT_PASS,
	STAT_PARKED,
	STAT_REDIRECTED,
	STAT_DROP_NO_HOST,   /* TO(host) with no host entry */
	STAT_DROP_TTL,       /* TTL or hop limit would reach 0 */
	STAT_DROP_PARK_FULL, /* the perf buffer refused a parked packet */
	STAT_GUARD_DROPPED,  /* guard: a frozen flow's packet dropped on a host */
	STAT_XDP_FALLBACK,   /* XDP passed a packet too large to redirect up to tc */
	STAT_NEW_DIVERTED,   /* a new connection's SYN sent to the host its service is diverted to */
	STAT_MAX,
};

#ifndef MAX_FLOWS /* the loader may choose another size */
#define MAX_FLOWS 65536
#endif
#define MAX_HOSTS 64
#define MAX_SERVICES 64

#endif
