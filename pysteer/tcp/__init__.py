"""TCP_REPAIR: dump and restore established sockets (see ARCHITECTURE.md section 4)."""
