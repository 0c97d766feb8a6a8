/* SPDX-License-Identifier: GPL-2.0 */
/* The guard's maps, on each host: flows frozen here, and the guard's counters. */
#ifndef PYSTEER_GUARD_MAPS_H
#define PYSTEER_GUARD_MAPS_H

#include "pysteer_structs.h"

#ifndef PIN_DIR
#error "PIN_DIR must be defined by the loader"
#endif

/* frozen flow -> packets dropped for it */
BPF_TABLE_PINNED("hash", struct flow_key, u64, frozen, MAX_FLOWS, PIN_DIR "/frozen");
BPF_TABLE_PINNED("percpu_array", u32, u64, guard_stats, STAT_MAX, PIN_DIR "/guard_stats");

#endif
