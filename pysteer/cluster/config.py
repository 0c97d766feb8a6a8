"""The cluster's TOML file, given with ``--config`` or ``PYSTEER_CONFIG``.

    [cluster]
    name = "prod"                      # optional: names the control sockets (default "default")
    vip = ["10.0.0.100", "fd00::64"]
    ca = "certs/ca.pem"                # cluster CA (PEM)
    key = "certs/cluster.key"          # seals migration blobs (32 bytes)

    [services.443]
    app = "ticker"                     # echo, ticker, http or module:Class
    tls = true
    cert = "certs/vip.pem"             # what clients see (needed with tls = true)
    key = "certs/vip.key"

    [steer]
    name = "steer"                     # the steering daemon's node name
    control = "10.0.1.1:7700"          # its mTLS listener
    cert = "certs/steer.pem"
    key = "certs/steer.key"

    [nodes.a]
    control = "10.0.2.2:7701"          # the agent's mTLS listener
    cert = "certs/a.pem"
    key = "certs/a.key"

Relative paths are relative to the file. Every problem is reported with its TOML path.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "PYSTEER_CONFIG"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ConfigError(ValueError):
    """The cluster file is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class NodeConfig:
    name: str
    control: tuple[str, int]
    cert: Path
    key: Path


@dataclass(frozen=True)
class Service:
    port: int
    app: str
    tls: bool
    cert: Path | None = None
    key: Path | None = None


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
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: invalid node name {name!r}")
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    unknown = sorted(set(table) - {"control", "cert", "key", "name"})
    if unknown:
        raise ConfigError(f"[{where}] has unknown key(s): {', '.join(unknown)}")
    return NodeConfig(
        name=name,
        control=_endpoint(_str(table, "control", where), f"{where}.control"),
        cert=_path(base, table, "cert", where),
        key=_path(base, table, "key", where),
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
        unknown = sorted(set(table) - {"app", "tls", "cert", "key"})
        if unknown:
            raise ConfigError(f"[{where}] has unknown key(s): {', '.join(unknown)}")
        cert = key = None
        if tls:
            cert, key = _path(base, table, "cert", where), _path(base, table, "key", where)
        services[int(port)] = Service(int(port), _str(table, "app", where), tls, cert, key)
    return services


def load_config(path: str | Path | None = None) -> ClusterConfig:
    """Read and check the cluster file (``path``, else ``$PYSTEER_CONFIG``)."""
    path = path or os.environ.get(ENV)
    if not path:
        raise ConfigError(f"no cluster file: give --config or set {ENV}")
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
    steer_table = _table(doc, "steer")
    steer = _node(str(steer_table.get("name", "steer")), steer_table, base, "steer")
    nodes_table = _table(doc, "nodes")
    if not nodes_table:
        raise ConfigError("[nodes] must name at least one node")
    nodes = {name: _node(name, t, base, f"nodes.{name}") for name, t in nodes_table.items()}
    if steer.name in nodes:
        raise ConfigError(f"the steering node {steer.name!r} is also listed under [nodes]")
    name = cluster.get("name", "default")
    if not isinstance(name, str) or not NAME_RE.match(name):
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
    )
