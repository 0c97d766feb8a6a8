"""``pysteer certs``: the cluster's keys, made once and handed out one host at a time.

``certs init --dir DIR`` makes, in a directory only you can write (created 0700):

- ``ca.pem``, ``ca.key``: the control-plane CA. Its key signs node identities, so it
  stays in DIR, on the machine where you ran this (keep it offline);
- ``NODE.pem`` (leaf then CA) and ``NODE.key`` for every ``--node``: each node's identity,
  for its mutual-TLS links (serverAuth and clientAuth, CN and DNS name = the node);
- ``cluster.key``: 32 random bytes that seal migration blobs;
- ``service.pem``, ``service.key``: what clients of the VIP see. Give your own
  (``--service-cert``/``--service-key``, e.g. from your usual CA), or let ``--service-name``
  make one under a separate service CA (``service-ca.pem``, for labs and tests; that CA's
  key is not kept). The control-plane CA never signs it: clients never need to trust
  the CA that makes node identities.

``certs bundle --dir DIR --node NODE --out OUT`` then writes exactly one host's files:
the CA certificate, that node's certificate and key, and, for a host that serves the VIP,
the cluster key and the service certificate and key (and ``cluster.toml``, if DIR has one:
it also says which node is the steering node; without it, give ``--role``).

``certs issue --dir DIR --node NODE`` adds a node, or renews one node's key, with the CA.

Keys are 0600, certificates 0644. An existing directory is used only when it is yours
and not writable by others; every file is written fresh and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pysteer.clitable import Command, LazyChoices, arg
from pysteer.cluster.config import NAME_RE
from pysteer.errors import UsageError
from pysteer.safefile import PRIVATE, PUBLIC, SafeDir, UnsafeDirectory, private_dir

T = TypeVar("T")
RESERVED = {"ca", "cluster", "service", "service-ca"}  # file names a node would clash with


def _kinds() -> tuple[str, ...]:
    """The key types, from pysteer.certs. Like cryptography and tomllib, it is imported
    only where used: every pysteer command builds this module's parsers."""
    from pysteer.certs import KEY_KINDS  # noqa: PLC0415

    return KEY_KINDS


KIND = arg("--kind", default="ecdsa", help="key type (ecdsa)", choices=LazyChoices(_kinds))
DAYS = arg("--days", type=int, default=365, help="validity (default: 365)")


def _check_node(name: str) -> None:
    """A node name as the cluster file takes it, and no name of the files beside it."""
    if not NAME_RE.fullmatch(name) or name in RESERVED:
        raise UsageError(
            f"invalid node name {name!r}: use [a-z0-9-], starting "
            f"alphanumeric, not one of {', '.join(sorted(RESERVED))}"
        )


def _load_service(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """The operator's service certificate chain and key, checked to belong together."""
    from cryptography import x509  # noqa: PLC0415 - see _kinds
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: PLC0415

    from pysteer.certs import key_matches  # noqa: PLC0415 - see _kinds

    try:
        chain, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the service certificate or key: {exc}") from None
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"the service certificate or key is not valid PEM: {exc}") from None
    if not key_matches(key, leaf):
        raise UsageError(f"{key_path} is not the key of {cert_path}")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
            raise UsageError(f"{cert_path} is not a server certificate (no serverAuth)")
    except x509.ExtensionNotFound:
        pass
    return chain, key_pem


def _clear_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """File errors as one clear line (UsageError), never a traceback: a directory that is
    not safely ours, a missing or unreadable file, a symlink where a key should be."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except UnsafeDirectory as exc:
            raise UsageError(f"refusing to use it for keys: {exc}") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            if exc.errno == errno.ELOOP:
                raise UsageError(
                    f"{where}is a symlink; pysteer never follows one to a key or a certificate"
                ) from None
            raise UsageError(f"{where}{exc.strerror or exc}") from None

    return wrapper


@_clear_errors
def write_cluster(
    directory: Path,
    nodes: dict[str, list[str]],
    *,
    service_names: list[str] | None = None,
    service: tuple[bytes, bytes] | None = None,
    kind: str = "ecdsa",
    days: int = 365,
    force: bool = False,
) -> None:
    """Write the control-plane CA, one certificate and key per node, the cluster key and,
    if asked, the service certificate (given as ``service`` = (chain, key), or made)."""
    from pysteer.certs import CertificateAuthority  # noqa: PLC0415 - see _kinds

    for name, names in nodes.items():
        claimed = sorted(set(names) & set(nodes) - {name})
        if claimed:  # a certificate naming another node could be taken for it
            raise UsageError(
                f"node {name!r} cannot also be named {', '.join(claimed)}: that is another node"
            )
        _check_node(name)
    with private_dir(directory) as out:
        if out.exists("ca.key") and not force:
            raise UsageError(f"{directory} already holds a cluster (ca.key); --force replaces it")
        out.remove_temporaries()  # of a run killed midway
        ca = CertificateAuthority("pysteer control-plane CA", kind=kind, days=days)
        out.write("ca.pem", ca.cert_pem, PUBLIC)
        out.write("ca.key", ca.key_pem(), PRIVATE)
        for name, names in nodes.items():
            # One certificate serves a node both as server (its listeners) and as client.
            # The node name is always a DNS name of it: peers verify each other by name.
            sans = [name, *(n for n in names if n != name)]
            issued = ca.issue(name, names=sans, kind=kind, days=days, usage="node")
            out.write(f"{name}.pem", issued.chain_pem, PUBLIC)
            out.write(f"{name}.key", issued.key_pem, PRIVATE)
        out.write("cluster.key", os.urandom(32), PRIVATE)
        if service_names:
            service_ca = CertificateAuthority("pysteer service CA", kind=kind, days=days)
            issued = service_ca.issue(
                service_names[0], names=service_names, kind=kind, days=days, usage="server"
            )
            out.write("service-ca.pem", service_ca.cert_pem, PUBLIC)
            service = (issued.chain_pem, issued.key_pem)
        if service is not None:
            out.write("service.pem", service[0], PUBLIC)
            out.write("service.key", service[1], PRIVATE)
        made = {"service-ca.pem"} if service_names else set()
        made |= {"service.pem", "service.key"} if service is not None else set()
        for stale in {"service-ca.pem", "service.pem", "service.key"} - made:
            out.remove(stale)  # --force: never hand out an earlier run's service files


def _cluster_dir(directory: Path) -> SafeDir:
    """An existing cluster directory, checked as safely ours before any key is read."""
    if not os.path.lexists(directory):
        raise UsageError(f"{directory} does not exist (make it with pysteer certs init)")
    return private_dir(directory)


def _role_from_config(source: SafeDir, node: str) -> str | None:
    import tomllib  # noqa: PLC0415 - see _kinds

    if not source.exists("cluster.toml"):
        return None
    text = source.read("cluster.toml")  # an OSError says which file (_clear_errors)
    try:
        config = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {source.path / 'cluster.toml'}: {exc}") from None
    if config.get("steer", {}).get("name") == node:
        return "steer"
    if node in config.get("nodes", {}):
        return "host"
    raise UsageError(f"{source.path / 'cluster.toml'} names no node {node!r}")


@_clear_errors
def write_bundle(
    directory: Path, node: str, out_dir: Path, *, role: str | None = None, force: bool = False
) -> list[str]:
    """Copy one host's files from ``directory`` to ``out_dir``; returns their names."""
    _check_node(node)
    with _cluster_dir(directory) as source:
        if not source.exists(f"{node}.key"):
            raise UsageError(f"{directory} has no key for node {node!r}")
        role = role or _role_from_config(source, node)
        if role is None:  # never guess: a wrong guess gives the steering node blob keys
            raise UsageError(
                f"{directory} has no cluster.toml to say what {node} is: "
                "give --role host or --role steer"
            )
        names = ["ca.pem", f"{node}.pem", f"{node}.key"]
        if role == "host":
            names.append("cluster.key")
            names += [n for n in ("service.pem", "service.key") if source.exists(n)]
        if source.exists("cluster.toml"):
            names.append("cluster.toml")
        files = {n: source.read(n) for n in names}
    with private_dir(out_dir) as out:
        there = [n for n in names if out.exists(n)]
        if there and not force:
            raise UsageError(f"{out_dir} already holds {', '.join(there)}; --force replaces")
        for name, data in files.items():
            out.write(name, data, PRIVATE if name.endswith(".key") else PUBLIC)
    return names


def parse_nodes(specs: list[str]) -> dict[str, list[str]]:
    nodes: dict[str, list[str]] = {}
    for spec in specs:
        name, _, names = spec.partition("=")
        _check_node(name)
        if name in nodes:
            raise UsageError(f"node {name!r} given twice")
        nodes[name] = [_check_san(n, name) for n in names.split(",") if n]
    return nodes


DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _check_san(text: str, node: str) -> str:
    """One name a certificate is for: an IP address, or a DNS name (letters, digits and
    hyphens in dot-separated labels; ``*.`` first for a wildcard)."""
    import ipaddress  # noqa: PLC0415 - only when certificates are made

    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(text.strip("[]")))
    labels = text.removeprefix("*.").rstrip(".").split(".")
    if len(text) <= 253 and all(DNS_LABEL.fullmatch(label) for label in labels):
        return text
    raise UsageError(
        f"node {node}: {text[:80]!r} is neither an IP address nor a DNS name (letters, "
        "digits and hyphens, in labels joined by dots)"
    )


def cmd_init(args: argparse.Namespace) -> int:
    nodes = parse_nodes(args.node)
    if args.days < 1:
        raise UsageError("--days must be at least 1")
    if bool(args.service_cert) != bool(args.service_key):
        raise UsageError("--service-cert and --service-key go together")
    if args.service_cert and args.service_name:
        raise UsageError("give either your service certificate or --service-name, not both")
    service = _load_service(args.service_cert, args.service_key) if args.service_cert else None
    service_names = [n for n in (args.service_name or "").split(",") if n] or None
    write_cluster(
        args.dir,
        nodes,
        service=service,
        service_names=service_names,
        kind=args.kind,
        days=args.days,
        force=args.force,
    )
    made = "service certificate" if service or service_names else "no service certificate"
    if args.json:
        out = {
            "dir": str(args.dir),
            "nodes": sorted(nodes),
            "service": made == "service certificate",
        }
        print(json.dumps(out))
        return 0
    print(
        f"cluster in {args.dir}: control-plane CA, {len(nodes)} node certificate(s), "
        f"cluster.key, {made}"
    )
    print(
        f"keep {args.dir / 'ca.key'} here; give each host only its own files: "
        f"pysteer certs bundle --dir {args.dir} --node NODE --out DIR"
    )
    return 0


@_clear_errors
def issue_node(
    directory: Path, name: str, names: list[str], *, kind: str = "ecdsa", days: int = 365
) -> None:
    """A new certificate and key for one node, from the CA kept in ``directory``."""
    from pysteer.certs import CertificateAuthority  # noqa: PLC0415 - see _kinds

    with _cluster_dir(directory) as out:
        if not out.exists("ca.key"):
            raise UsageError(f"{directory} has no CA key (ca.key): issue where the CA is kept")
        try:
            ca = CertificateAuthority.load(out.read("ca.pem"), out.read("ca.key"))
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot load the CA in {directory}: {exc}") from None
        issued = ca.issue(
            name, names=[name, *(n for n in names if n != name)], kind=kind, days=days, usage="node"
        )
        out.write(f"{name}.pem", issued.chain_pem, PUBLIC)
        out.write(f"{name}.key", issued.key_pem, PRIVATE)


def cmd_issue(args: argparse.Namespace) -> int:
    ((name, names),) = parse_nodes([args.node]).items()
    if args.days < 1:
        raise UsageError("--days must be at least 1")
    issue_node(args.dir, name, names, kind=args.kind, days=args.days)
    if args.json:
        print(
            json.dumps(
                {"dir": str(args.dir), "node": name, "files": [f"{name}.pem", f"{name}.key"]}
            )
        )
        return 0
    print(
        f"{args.dir}: new {name}.pem and {name}.key; hand them out with "
        f"pysteer certs bundle --dir {args.dir} --node {name} --out DIR"
    )
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    names = write_bundle(args.dir, args.node, args.out, role=args.role, force=args.force)
    if args.json:
        print(json.dumps({"out": str(args.out), "node": args.node, "files": list(names)}))
    else:
        print(f"{args.out}: {' '.join(names)}")
    return 0


JSON = arg("--json", action="store_true", help="machine-readable output")


CERTS = Command(
    "certs",
    help="make the cluster's keys, and hand them out per host",
    description=__doc__,
    verbatim=True,
    actions=(
        Command(
            "init",
            help="create the control-plane CA, a certificate per node, the cluster key and the "
            "service certificate",
            description="Make, in DIR (created 0700; an existing one must be yours and not "
            "writable by others): the control-plane CA (ca.pem, ca.key: keep the key offline), "
            "NODE.pem and NODE.key for every --node (its identity for mutual TLS: CN and DNS "
            "name are the node's name), cluster.key (seals migration blobs) and the service "
            "certificate clients of the VIP see (--service-cert/--service-key, or one made "
            "for --service-name under a service CA of its own). Then give each host only its "
            "own files with `pysteer certs bundle`. See `pysteer certs --help`.",
            args=(
                arg(
                    "--dir",
                    type=Path,
                    required=True,
                    help="where to write the files (created 0700; an existing one must be "
                    "yours and not writable by others)",
                ),
                arg(
                    "--node",
                    action="append",
                    required=True,
                    metavar="NAME[=NAMES]",
                    help="a node and, after '=', its DNS names and addresses, comma-separated "
                    "(repeat for each node, the steering node included)",
                ),
                arg(
                    "--service-cert",
                    type=Path,
                    metavar="PEM",
                    help="your service certificate (leaf first, then its chain)",
                ),
                arg("--service-key", type=Path, metavar="PEM", help="its private key"),
                arg(
                    "--service-name",
                    metavar="NAMES",
                    help="instead: make a service certificate for these comma-separated "
                    "names under a separate service CA (service-ca.pem)",
                ),
                KIND,
                DAYS,
                arg("--force", action="store_true", help="replace an existing cluster"),
                JSON,
            ),
            run=cmd_init,
        ),
        Command(
            "issue",
            help="issue (or renew) one node's certificate and key with the existing CA",
            description="Issue a new certificate and key for NODE with the CA in DIR: to add a "
            "node, or to rotate one node's key (then bundle it and restart that node's daemon). "
            "Other nodes keep theirs.",
            args=(
                arg("--dir", type=Path, required=True, help="the cluster made by certs init"),
                arg(
                    "--node",
                    required=True,
                    metavar="NAME[=NAMES]",
                    help="the node and, after '=', its DNS names and addresses",
                ),
                KIND,
                DAYS,
                JSON,
            ),
            run=cmd_issue,
        ),
        Command(
            "bundle",
            help="write exactly one host's files (its key, the CA certificate, the cluster key)",
            description="Write into OUT only what NODE needs: ca.pem, NODE.pem, NODE.key and, "
            "unless NODE is the steering node, cluster.key and the service certificate and key; "
            "cluster.toml too when DIR has one. The CA key and other nodes' keys stay in DIR. "
            "Copy OUT to the host (e.g. tar over ssh) into a root-only directory.",
            args=(
                arg("--dir", type=Path, required=True, help="the cluster made by certs init"),
                arg("--node", required=True, help="the host to write the files of"),
                arg(
                    "--out",
                    type=Path,
                    required=True,
                    help="where to write them (created 0700, or yours and not writable by others)",
                ),
                arg(
                    "--role",
                    choices=("host", "steer"),
                    help="host (serves the VIP) or steer; default: what DIR/cluster.toml "
                    "says (without one, --role is needed)",
                ),
                arg("--force", action="store_true", help="replace files already in OUT"),
                JSON,
            ),
            run=cmd_bundle,
        ),
    ),
)
