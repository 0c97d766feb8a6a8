"""Errors shared across pysteer's modules."""


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message and exits with code 2."""
