"""``pysteer certs init``: a cluster CA, one certificate per node, and the cluster key.

Writes, in ``--dir``: ``ca.pem``, ``ca.key``, ``<node>.pem`` (leaf then CA), ``<node>.key``
and ``cluster.key`` (32 random bytes that seal migration blobs). Private keys are 0600.
It refuses to overwrite an existing cluster unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from pysteer.certs import KEY_KINDS, CertificateAuthority
from pysteer.errors import UsageError

NODE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def add_parser(sub: Any) -> None:
    certs = sub.add_parser("certs", help="make the cluster's CA, node certificates and key")
    cmds = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = cmds.add_parser(
        "init",
        help="create a cluster CA, a certificate per node and the cluster key",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--dir", type=Path, required=True, help="where to write the files")
    init.add_argument("--node", action="append", required=True, metavar="NAME[=NAMES]",
                      help="a node and, after '=', its DNS names and addresses, comma-separated "
                           "(repeat for each node)")  # fmt: skip
    init.add_argument("--kind", choices=KEY_KINDS, default="ecdsa", help="key type (ecdsa)")
    init.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    init.add_argument("--force", action="store_true", help="replace an existing cluster")
    init.set_defaults(func=cmd_init)


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def write_cluster(
    directory: Path,
    nodes: dict[str, list[str]],
    *,
    kind: str = "ecdsa",
    days: int = 365,
    force: bool = False,
) -> None:
    """Write the CA, one certificate and key per node, and the cluster key."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.key").exists() and not force:
        raise UsageError(f"{directory} already holds a cluster (ca.key); --force replaces it")
    ca = CertificateAuthority("pysteer cluster CA", kind=kind, days=days)
    _write(directory / "ca.pem", ca.cert_pem, private=False)
    _write(directory / "ca.key", ca.key_pem(), private=True)
    for name, names in nodes.items():
        # One certificate serves a node both as server (its listeners) and as client.
        # The node name is always a DNS name of it: peers verify each other by name.
        sans = [name, *(n for n in names if n != name)]
        issued = ca.issue(name, names=sans, kind=kind, days=days, both=True)
        _write(directory / f"{name}.pem", issued.chain_pem, private=False)
        _write(directory / f"{name}.key", issued.key_pem, private=True)
    _write(directory / "cluster.key", os.urandom(32), private=True)


def cmd_init(args: argparse.Namespace) -> int:
    nodes: dict[str, list[str]] = {}
    for spec in args.node:
        name, _, names = spec.partition("=")
        if not NODE_RE.match(name):
            raise UsageError(f"invalid node name {name!r}: use [a-z0-9-], starting alphanumeric")
        if name in nodes:
            raise UsageError(f"node {name!r} given twice")
        nodes[name] = [n for n in names.split(",") if n]
    if args.days < 1:
        raise UsageError("--days must be at least 1")
    write_cluster(args.dir, nodes, kind=args.kind, days=args.days, force=args.force)
    print(f"cluster in {args.dir}: CA, {len(nodes)} node certificate(s), cluster.key")
    return 0
