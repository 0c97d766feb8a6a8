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

/* The TCP header after `ip` (as parse_flow returned it), or NULL. */
static __always_inline struct tcphdr *tcp_of(void *ip, void *data_end, __u8 family)
{
	struct tcphdr *tcp = family == 4 ? (void *)((struct iphdr *)ip + 1)
					 : (void *)((struct ipv6hdr *)ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return NULL;
	return tcp;
}

/* What connection tracking needs of one segment. */
struct tcp_seg {
	__u32 seq;
	__u32 ack_seq;
	__u32 end; /* seq + payload + SYN + FIN: the sequence number after this segment */
	__u8 syn;
	__u8 ack;
	__u8 fin;
	__u8 rst;
};

/* Fill `seg` from the TCP header after `ip`; `len` is the whole frame's length (the IP
 * length field of a GSO packet is not reliable). Returns 0 if there is no TCP header. */
static __always_inline int parse_seg(void *ip, void *data_end, __u8 family, __u32 len,
				     struct tcp_seg *seg)
{
	struct tcphdr *tcp = tcp_of(ip, data_end, family);
	if (!tcp)
		return 0;
	__u32 headers = sizeof(struct ethhdr) + tcp->doff * 4 +
			(family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
	__u32 payload = len > headers ? len - headers : 0;
	seg->seq = bpf_ntohl(tcp->seq);
	seg->ack_seq = bpf_ntohl(tcp->ack_seq);
	seg->syn = tcp->syn;
	seg->ack = tcp->ack;
	seg->fin = tcp->fin;
	seg->rst = tcp->rst;
	seg->end = seg->seq + payload + seg->syn + seg->fin;
	return 1;
}

/* The key of the flow a service -> client packet belongs to (keys are client -> service). */
static __always_inline void reverse_key(struct flow_key *key)
{
	__be16 port = key->sport;
	key->sport = key->dport;
	key->dport = port;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__be32 addr = key->saddr[i];
		key->saddr[i] = key->daddr[i];
		key->daddr[i] = addr;
	}
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
