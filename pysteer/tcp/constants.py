"""Kernel constants for TCP repair that Python's ``socket`` module lacks (linux/tcp.h)."""

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_NOTSENT_LOWAT = 25
TCP_REPAIR_WINDOW = 29

# TCP_REPAIR_QUEUE values
TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

# TCP_REPAIR_OPTIONS option codes
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

# ioctls on a TCP socket
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B

# TCP_REPAIR values (TCP_REPAIR_OFF_NO_WP leaves repair mode without a window probe)
TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0
TCP_REPAIR_OFF_NO_WP = -1

# Socket options not all Python versions name
TCP_QUICKACK = 12
SO_PRIORITY = 12
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_MARK = 36
IPV6_TCLASS = 67

# Packets pysteer injects carry this mark (like CRIU's SOCCR_MARK), so that a network lock
# or guard can let them through while it drops the frozen flow's other packets.
INJECT_MARK = 0x70737472  # "pstr"
