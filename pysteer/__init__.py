"""pysteer: live migration of established TCP and TLS connections."""

__version__ = "0.1.0"
