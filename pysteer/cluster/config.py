"""The cluster's TOML file, given with ``--config`` or ``PYSTEER_CONFIG``.

    [cluster]
    name = "prod"                      # optional: names the control sockets (default "default")
    vip = ["10.0.0.100", "fd00::64"]
    ca = "certs/ca.pem"                # cluster CA (PEM)
    key = "certs/cluster.key"          # seals migration blobs (32 bytes)

    [services.443]
    app = "ticker"                     # echo, ticker, http, proxy or module:Class
    tls = true
    cert = "certs/service.pem"         # what clients see (needed with tls = true)
    key = "certs/service.key"

    [services.8443]                    # an unmodified local service behind pysteer
    app = "proxy"
    backend = "127.0.0.1:8080"         # on each host, that host's own
    protocol = "http/1.1"              # or "tcp" (moves after idle_ms of silence)
    proxy_protocol = "v2"              # optional: a PROXY v2 header on each backend link
    forwarded = "x-forwarded-for"      # http: or "forwarded", "none" (default: x-f-f
                                       # without proxy_protocol, none with it)

    [steer]
    name = "steer"                     # the steering daemon's node name
    control = "10.0.1.1:7700"          # its mTLS listener
    cert = "certs/steer.pem"
    key = "certs/steer.key"

    [nodes.a]
    control = "10.0.2.2:7701"          # the agent's mTLS listener
    cert = "certs/a.pem"
    key = "certs/a.key"
    remote = true                      # or: netns = "lab-a" (optional, not both)
    drain_to = "b"                     # optional: on SIGTERM, drain to b before stopping
    drain_timeout = 60                 # optional: seconds that drain may take (default 60)
    workers = 2                        # optional: agent processes (default 1; see below)

    [store]                            # optional: the shared store (etcd), see below
    endpoints = ["10.0.1.5:2379"]      # its members' client addresses (TLS only)
    timeout = 2.0                      # optional: seconds for one call (default 2)

Relative paths are relative to the file. Every problem is reported with its TOML path.

Where the CLI may send TCP to a node whose local control socket is missing (its agent is
down, or runs elsewhere) is part of the file, because a wrong guess sends a TLS handshake
out of the default route to a network that is not ours:

- ``remote = true``: the node is another machine; reach its mutual-TLS listener from here.
- ``netns = "NAME"``: the node is the network namespace NAME on this machine (a lab); the
  CLI connects from inside it, so no packet leaves the CLI's own namespace.
- neither: only the local socket; a missing one means the agent is down, and nothing is sent.

``[steer]`` takes the same two keys. Several steering nodes (behind a router's ECMP) are
``[steer.NAME]`` tables instead, one per node, each with the keys of ``[steer]`` but
``name``; they then need the shared store, ``[store]``, to agree on the moved flows.

``[store]`` names the etcd members that hold the cluster's shared state (which host
serves each moved flow). Every daemon reaches them with its own certificate and trusts the
cluster CA; each member's certificate must carry the name ``etcd``. Without it, each
steering node's own table is the only record (one steering node).

``workers = N`` (1..64) runs a node's agent as N worker processes under one supervisor, to
use N cores: worker I listens for its peers on the control port + I, so every node (and
every node's copy of the file) must agree on N, and those ports must be free. See
``pysteer.agent.supervisor``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysteer.netns import netns_path
from pysteer.proxy.spec import ProxySpec, SpecError, make_spec

ENV = "PYSTEER_CONFIG"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_WORKERS = 64
MAX_STEERS = 16  # steering nodes in one cluster
MAX_STORE_ENDPOINTS = 9  # etcd members a client is given (a cluster of 1, 3, 5, 7 or 9)


class ConfigError(ValueError):
    """The cluster file is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class NodeConfig:
    name: str
    control: tuple[str, int]
    cert: Path
    key: Path
    netns: str | None = None  # the network namespace it lives in, on this machine
    remote: bool = False  # another machine: TCP to it from the CLI's own namespace is fine
    drain_to: str | None = None  # where its agent drains to on SIGTERM
    drain_timeout: float = 60.0
    workers: int = 1  # agent processes; worker I's peer listener is control port + I

    def worker_control(self, worker: int) -> tuple[str, int]:
        """The peer listener of this node's worker ``worker``."""
        return self.control[0], self.control[1] + worker


@dataclass(frozen=True)
class Service:
    port: int
    app: str
    tls: bool
    cert: Path | None = None
    key: Path | None = None
    proxy: ProxySpec | None = None  # app = "proxy": its backend and protocol


@dataclass(frozen=True)
class StoreConfig:
    """Where the shared store's members listen (etcd, mutual TLS with the cluster CA)."""

    endpoints: tuple[tuple[str, int], ...]
    timeout: float = 2.0


@dataclass(frozen=True)
class ClusterConfig:
    path: Path
    name: str
    vips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    ca: Path
    cluster_key: Path
    services: dict[int, Service]
    steer: NodeConfig
    nodes: dict[str, NodeConfig]
    store: StoreConfig | None = None
    more_steers: tuple[NodeConfig, ...] = ()  # steering nodes after the first

    @property
    def steers(self) -> tuple[NodeConfig, ...]:
        """Every steering node, the first one first (``steer``)."""
        return (self.steer, *self.more_steers)

    def names(self) -> set[str]:
        """Every identity of the cluster: the hosts and the steering nodes."""
        return {*self.nodes, *(s.name for s in self.steers)}

    def node(self, name: str) -> NodeConfig:
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(sorted(self.nodes))
            raise ConfigError(f"unknown node {name!r} (nodes: {known})") from None


def _table(doc: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"[{where}{key}] is missing or not a table")
    return value


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key} must be a non-empty string")
    return value


def _path(base: Path, table: dict[str, Any], key: str, where: str) -> Path:
    path = Path(_str(table, key, where))
    return path if path.is_absolute() else base / path


def _endpoint(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where} must be ADDRESS:PORT, not {text!r}") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where} must be ADDRESS:PORT, not {text!r}")
    return host, int(port)


def _node(name: str, table: Any, base: Path, where: str) -> NodeConfig:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: invalid node name {name!r}")
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    keys = {
        "control",
        "cert",
        "key",
        "name",
        "netns",
        "remote",
        "drain_to",
        "drain_timeout",
        "workers",
    }
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"[{where}] has unknown key(s): {', '.join(unknown)}")
    netns = None
    if "netns" in table:
        netns = _str(table, "netns", where)
        try:
            netns_path(netns)
        except ValueError:
            raise ConfigError(f"{where}.netns: invalid namespace name {netns!r}") from None
    remote = table.get("remote", False)
    if not isinstance(remote, bool):
        raise ConfigError(f"{where}.remote must be true or false")
    if netns is not None and remote:
        raise ConfigError(
            f"[{where}] has both netns and remote: a node is a namespace here or another "
            "machine, not both"
        )
    drain_to = _str(table, "drain_to", where) if "drain_to" in table else None
    if drain_to == name:
        raise ConfigError(f"{where}.drain_to: a node cannot drain to itself")
    timeout = table.get("drain_timeout", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ConfigError(f"{where}.drain_timeout must be a number of seconds in (0, 3600]")
    workers = table.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{where}.workers must be an integer in [1, {MAX_WORKERS}]")
    control = _endpoint(_str(table, "control", where), f"{where}.control")
    if (last := control[1] + workers - 1) > 65535:
        raise ConfigError(f"{where}: its {workers} workers would listen on ports up to {last}")
    return NodeConfig(
        name=name,
        control=control,
        cert=_path(base, table, "cert", where),
        key=_path(base, table, "key", where),
        netns=netns,
        remote=remote,
        drain_to=drain_to,
        drain_timeout=float(timeout),
        workers=workers,
    )


def _services(tables: dict[str, Any], base: Path) -> dict[int, Service]:
    services: dict[int, Service] = {}
    for port, table in tables.items():
        where = f"services.{port}"
        if not port.isdigit() or not 1 <= int(port) <= 65535 or not isinstance(table, dict):
            raise ConfigError(f"[{where}]: the key must be a port and the value a table")
        tls = table.get("tls", False)
        if not isinstance(tls, bool):
            raise ConfigError(f"{where}.tls must be true or false")
        unknown = sorted(set(table) - {"app", "tls", "cert", "key", *PROXY_KEYS})
        if unknown:
            raise ConfigError(f"[{where}] has unknown key(s): {', '.join(unknown)}")
        cert = key = None
        if tls:
            cert, key = _path(base, table, "cert", where), _path(base, table, "key", where)
        app = _str(table, "app", where)
        proxy = _proxy(table, where) if app == "proxy" else None
        if proxy is None and (misplaced := sorted(set(table) & set(PROXY_KEYS))):
            raise ConfigError(f'[{where}]: {", ".join(misplaced)} only go with app = "proxy"')
        services[int(port)] = Service(int(port), app, tls, cert, key, proxy)
    return services


PROXY_KEYS = ("backend", "protocol", "proxy_protocol", "forwarded", "idle_ms", "read_timeout")


def _proxy(table: dict[str, Any], where: str) -> ProxySpec:
    """A proxy service's settings (app = "proxy"), checked."""
    if "backend" not in table:
        raise ConfigError(f'{where}.backend is needed with app = "proxy" (e.g. "127.0.0.1:8080")')
    words = {k: table[k] for k in PROXY_KEYS if k in table}
    for key in ("backend", "protocol", "proxy_protocol", "forwarded"):
        if key in words and not isinstance(words[key], str):
            raise ConfigError(f"{where}.{key} must be a string")
    try:
        return make_spec(**words)
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _steers(table: dict[str, Any], base: Path) -> list[NodeConfig]:
    """``[steer]``: one steering node; or ``[steer.NAME]`` tables: one each (behind a
    router's ECMP, each with the same flow overrides from the shared store)."""
    several = bool(table) and all(isinstance(v, dict) for v in table.values())
    if several:
        if len(table) > MAX_STEERS:
            raise ConfigError(f"[steer]: at most {MAX_STEERS} steering nodes")
        steers = [_node(name, t, base, f"steer.{name}") for name, t in table.items()]
    else:
        steers = [_node(str(table.get("name", "steer")), table, base, "steer")]
    for one in steers:
        if one.workers != 1:
            where = f"steer.{one.name}" if several else "steer"
            raise ConfigError(f"{where}.workers: the steering daemon runs as one process")
    return steers


def _check_roles(
    steers: list[NodeConfig], nodes: dict[str, NodeConfig], store: StoreConfig | None
) -> None:
    for one in steers:
        if one.name in nodes:
            raise ConfigError(f"the steering node {one.name!r} is also listed under [nodes]")
    if len(steers) > 1 and store is None:
        raise ConfigError(
            f"{len(steers)} steering nodes need the shared store ([store]): without it a "
            "node that restarts or joins does not know which flows were moved"
        )


def _store(doc: dict[str, Any]) -> StoreConfig | None:
    if "store" not in doc:
        return None
    table = _table(doc, "store")
    unknown = sorted(set(table) - {"endpoints", "timeout"})
    if unknown:
        raise ConfigError(f"[store] has unknown key(s): {', '.join(unknown)}")
    raw = table.get("endpoints")
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        raise ConfigError('store.endpoints must be a list of "ADDRESS:PORT" strings')
    if len(raw) > MAX_STORE_ENDPOINTS:
        raise ConfigError(f"store.endpoints: at most {MAX_STORE_ENDPOINTS} members")
    endpoints = tuple(_endpoint(e, "store.endpoints") for e in raw)
    if len({":" in h for h, _ in endpoints}) > 1:
        raise ConfigError("store.endpoints must be all IPv4 or all IPv6")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError("store.endpoints lists a member twice")
    timeout = table.get("timeout", 2.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ConfigError("store.timeout must be a number of seconds in (0, 60]")
    return StoreConfig(endpoints, float(timeout))


def _check_ports(nodes: list[NodeConfig]) -> None:
    """Two listeners on one address and port: a node's workers take control port + I."""
    taken: dict[tuple[str, int], str] = {}
    for node in nodes:
        for i in range(node.workers):
            where = taken.setdefault(node.worker_control(i), node.name)
            if where != node.name:
                host, port = node.worker_control(i)
                raise ConfigError(
                    f"nodes {where} and {node.name} both listen on {host}:{port} (a node with "
                    "workers = N takes its control port and the N - 1 after it)"
                )


def load_config(path: str | Path | None = None) -> ClusterConfig:
    """Read and check the cluster file (``path``, else ``$PYSTEER_CONFIG``)."""
    path = path or os.environ.get(ENV)
    if not path:
        raise ConfigError(f"no cluster file: give --config or set {ENV}")
    # The CLI imports this module to build its parsers (ENV): it starts faster without
    # tomllib until a file is read.
    import tomllib  # noqa: PLC0415

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    base = path.parent
    cluster = _table(doc, "cluster")
    vips_raw = cluster.get("vip")
    if isinstance(vips_raw, str):
        vips_raw = [vips_raw]
    if not isinstance(vips_raw, list) or not vips_raw:
        raise ConfigError("cluster.vip must be an address or a list of addresses")
    try:
        vips = tuple(ipaddress.ip_address(v) for v in vips_raw)
    except ValueError as exc:
        raise ConfigError(f"cluster.vip: {exc}") from None
    services = _services(_table(doc, "services"), base)
    steers = _steers(_table(doc, "steer"), base)
    steer = steers[0]
    nodes_table = _table(doc, "nodes")
    if not nodes_table:
        raise ConfigError("[nodes] must name at least one node")
    nodes = {name: _node(name, t, base, f"nodes.{name}") for name, t in nodes_table.items()}
    for node in nodes.values():
        if node.drain_to is not None and node.drain_to not in nodes:
            raise ConfigError(f"nodes.{node.name}.drain_to: unknown node {node.drain_to!r}")
    _check_ports([*steers, *nodes.values()])
    store = _store(doc)
    _check_roles(steers, nodes, store)
    name = cluster.get("name", "default")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"cluster.name must match {NAME_RE.pattern}, not {name!r}")
    return ClusterConfig(
        path=path,
        name=name,
        vips=vips,
        ca=_path(base, cluster, "ca", "cluster"),
        cluster_key=_path(base, cluster, "key", "cluster"),
        services=services,
        steer=steer,
        nodes=nodes,
        store=store,
        more_steers=tuple(steers[1:]),
    )
