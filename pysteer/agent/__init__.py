"""The per-host agent: serves the app runtime, moves its connections to and from peers.

``pysteer agent run`` starts one per host. It exports a connection (park, freeze, dump,
seal) and sends it to a peer agent over mutual TLS; the peer restores it frozen, and the
move commits only when both the peer and the steering node have done their part.
"""
