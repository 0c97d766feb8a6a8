/* SPDX-License-Identifier: GPL-2.0 */
/* Packet parsing and rewriting helpers shared by the tc and XDP programs. They work on
 * direct packet pointers, so the same code serves both hooks. */
#ifndef PYSTEER_PARSE_H
#define PYSTEER_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "pysteer_structs.h"

/* Fill `key` from an Ethernet frame; returns a pointer to the IP header, or NULL when the
 * packet is not TCP over IPv4/IPv6 (those are always passed). */
static __always_inline void *parse_flow(void *data, void *data_end, struct flow_key *key)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return NULL;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
			return NULL;
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return NULL;
		key->family = 4;
		key->proto = IPPROTO_TCP;
		key->saddr[0] = ip->saddr;
		key->daddr[0] = ip->daddr;
		key->sport = tcp->source;
		key->dport = tcp->dest;
		return ip;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return NULL;
		struct tcphdr *tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			return NULL;
		key->family = 6;
		key->proto = IPPROTO_TCP;
		/* word by word: clang turns __builtin_memcpy on packet data into a libcall */
#pragma unroll
		for (int i = 0; i < 4; i++) {
			key->saddr[i] = ip6->saddr.in6_u.u6_addr32[i];
			key->daddr[i] = ip6->daddr.in6_u.u6_addr32[i];
		}
		key->sport = tcp->source;
		key->dport = tcp->dest;
		return ip6;
	}
	return NULL;
}

/* Whether the TCP segment after `ip` (as parse_flow returned it) opens a connection: SYN
 * without ACK. */
static __always_inline int is_syn(void *ip, void *data_end, __u8 family)
{
	struct tcphdr *tcp = family == 4 ? (void *)((struct iphdr *)ip + 1)
					 : (void *)((struct ipv6hdr *)ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return 0;
	return tcp->syn && !tcp->ack;
}

/* Forward like a router: decrement TTL (fixing the IPv4 checksum) or the hop limit.
 * Returns 0 when the packet must be dropped instead (it would expire). */
static __always_inline int decrement_ttl(void *ip, void *data_end, __u8 family)
{
	if (family == 4) {
		struct iphdr *iph = ip;
		if ((void *)(iph + 1) > data_end || iph->ttl <= 1)
			return 0;
		/* RFC 1624 incremental update for ttl - 1 (ttl is the high byte of its word) */
		__u32 check = iph->check;
		check += bpf_htons(0x0100);
		iph->check = (__sum16)(check + (check >= 0xFFFF));
		iph->ttl--;
		return 1;
	}
	struct ipv6hdr *ip6 = ip;
	if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
		return 0;
	ip6->hop_limit--;
	return 1;
}

static __always_inline int rewrite_macs(void *data, void *data_end, struct host_entry *host)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return 0;
#pragma unroll
	for (int i = 0; i < 6; i++) {
		eth->h_dest[i] = host->dmac[i];
		eth->h_source[i] = host->smac[i];
	}
	return 1;
}

#endif
