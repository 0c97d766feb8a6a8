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
	ACTION_NONE = 3, /* prev_action only: the flow had no entry before it was parked */
};

/* What to do with a flow: written by userspace (the programs insert TO(host) for a
 * diverted SYN, and delete an entry whose connection ended). The programs read only
 * `action` and `host`; the rest is the daemon's migration bookkeeping, kept in the pinned
 * map so that it survives a daemon restart. */
struct flow_action {
	__u32 action;
	__u32 host;
	__u32 prev_action; /* PARK: what a rollback restores (ACTION_NONE: no entry) */
	__u32 prev_host;
	__u64 token;       /* the migration that parked (PARK) or moved (TO) the flow; 0: none */
	__u64 lease_ns;    /* PARK: CLOCK_MONOTONIC deadline of the migration; 0: none */
};

/* Per-direction flags in flow_stats (0: client -> service, 1: service -> client). */
#define F_NXT 1 /* nxt is known */
#define F_FIN 2 /* a FIN was seen; fin_end holds the sequence number after it */
#define F_SYN 4 /* direction 0 only: a SYN was seen; syn_seq holds its sequence number */

/* A flow's counters and connection tracking: written by the programs only (userspace
 * never writes them back, so a park sequence number can never be rewound by a
 * read-modify-write). Tracking is what lets an entry go when its connection ends. */
struct flow_stats {
	__u64 park_seq;   /* packets parked so far: each carries its number */
	__u64 packets[3]; /* per action */
	__u64 bytes[3];
	__u64 last_ns;    /* bpf_ktime_get_ns() of the last packet either way (idle timeout) */
	__u32 syn_seq;    /* the client's SYN sequence number (F_SYN) */
	__u32 fin_end[2]; /* per direction: the sequence number after its FIN (F_FIN) */
	__u32 nxt[2];     /* per direction: the highest sequence number sent so far (F_NXT) */
	__u8 flags[2];    /* per direction: F_* */
	__u8 pad[2];
};

/* Where TO(host) sends a packet: out of `ifindex` with these MACs. */
struct host_entry {
	__u32 ifindex;
	__u8 dmac[6];
	__u8 smac[6];
	__u32 mtu; /* the link's MTU: XDP hands larger (GSO) packets to the tc fallback */
	char name[16]; /* the host's name, so a restarted daemon keeps every host's id */
};

/* A service address (a VIP): new connections to it can be sent to one host (a drain). */
struct service_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__be32 addr[4];
};

/* How a migration ended, by its token (see the decisions map). */
enum decision_outcome {
	DECISION_COMMITTED = 1, /* the target claimed the flow: it serves it */
	DECISION_ABORTED = 2,   /* rolled back: the source keeps it */
};

struct decision {
	__u32 outcome;
	__u32 host; /* the host that serves the flow after it */
	__u64 at_ns; /* CLOCK_MONOTONIC time of the decision */
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
	STAT_DIVERT_FAILED,  /* a SYN that should have been diverted was not: the table is full */
	STAT_CLOSED_FIN,     /* entries removed at the last ACK after both FINs */
	STAT_CLOSED_RST,     /* entries removed at a RST */
	STAT_STALE_SYN,      /* entries of an ended connection replaced by a new SYN on its 4-tuple */
	STAT_STATS_FULL,     /* a flow's counters could not be created: no room */
	STAT_MAX,
};

#ifndef MAX_FLOWS /* the loader may choose another size */
#define MAX_FLOWS 65536
#endif
#define MAX_HOSTS 64
#define MAX_SERVICES 64
#define MAX_DECISIONS 65536

#endif
