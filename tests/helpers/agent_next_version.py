"""Run ``pysteer`` as if it were the next release, whose RPC has another version: what a
node of a mixed cluster meets during an upgrade (the product has no switch for it).

    agent_next_version.py agent run --config ... --node ...
"""

from __future__ import annotations

import sys

import pysteer.rpc
from pysteer.cli import main
from pysteer.rpc import codec

NEXT = pysteer.rpc.VERSION + 1
pysteer.rpc.VERSION = codec.VERSION = NEXT
codec.SUPPORTED = frozenset({NEXT})

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
