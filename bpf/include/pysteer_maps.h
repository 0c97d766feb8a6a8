/* SPDX-License-Identifier: GPL-2.0 */
/* The steering node's maps (declarations only: BCC rewrites map calls only in the main
 * source file, so every .lookup() lives in steer.c). PIN_DIR (a string literal, given by the loader) is where the
 * flow table, the hosts and the counters are pinned, so a restarted daemon finds them. */
#ifndef PYSTEER_MAPS_H
#define PYSTEER_MAPS_H

#include "pysteer_structs.h"

#ifndef PIN_DIR
#error "PIN_DIR must be defined by the loader"
#endif

BPF_TABLE_PINNED("hash", struct flow_key, struct flow_action, flows, MAX_FLOWS, PIN_DIR "/flows");
BPF_TABLE_PINNED("hash", struct flow_key, struct flow_stats, flow_stats, MAX_FLOWS,
		 PIN_DIR "/flow_stats");
BPF_TABLE_PINNED("array", u32, struct host_entry, hosts, MAX_HOSTS, PIN_DIR "/hosts");
BPF_TABLE_PINNED("percpu_array", u32, u64, stats, STAT_MAX, PIN_DIR "/stats");
/* service address -> host id: new connections to it go to that host (see divert). */
BPF_TABLE_PINNED("hash", struct service_key, u32, new_flows, MAX_SERVICES, PIN_DIR "/new_flows");
/* migration token -> how it ended (userspace only): the commit point's record, so that a
 * source or target that lost an answer, or restarted, learns the outcome. LRU: old
 * outcomes make room for new ones. */
BPF_TABLE_PINNED("lru_hash", u64, struct decision, decisions, MAX_DECISIONS,
		 PIN_DIR "/decisions");
BPF_PERF_OUTPUT(parked);

#endif
