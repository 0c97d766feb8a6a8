"""Where the shared state lives in etcd, and how a value is written and checked.

Every key is under ``/pysteer/<cluster>/``:

- ``overrides/<flow>``: the host that serves a moved flow, instead of the steering
  node's default. Its version is etcd's ``mod_revision`` of the key: a writer compares
  it in a transaction, so two writers can never both win.
- ``diversions/<vip>``: the host that a drain sends new connections to the VIP to.
- ``admission/<node>``: whether the node takes imports, and where it was drained to (a
  cordon or a drain), so that a host that comes back without its disk keeps it.

A value is msgpack. A value read back is checked as strictly as a message from the
network: etcd is shared, and a bad value must be refused with a clear error, never
steer a flow somewhere odd.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from pysteer.flow import Flow, FlowSyntaxError

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # cluster and node names (as the cluster file)
MAX_VALUE = 512  # bytes: an override is a few dozen


class StoreDataError(ValueError):
    """A key or value in the store that pysteer did not write as it is; says which."""


def prefix(cluster: str) -> bytes:
    if not NAME.fullmatch(cluster):
        raise ValueError(f"invalid cluster name {cluster!r}")
    return f"/pysteer/{cluster}/".encode()


def overrides_prefix(cluster: str) -> bytes:
    return prefix(cluster) + b"overrides/"


def override_key(cluster: str, flow: Flow | str) -> bytes:
    return overrides_prefix(cluster) + str(flow).encode()


@dataclass(frozen=True)
class Override:
    """``flow`` is served by ``host`` since the migration ``by`` (its token, 16 hex
    digits: both sides of a move write the same value, so the second finds its own);
    ``revision`` is its version in the store (0: not stored)."""

    flow: str
    host: str
    by: str
    revision: int = 0

    def encode(self) -> bytes:
        return msgpack.packb({"host": self.host, "by": self.by})


def decode_override(cluster: str, key: bytes, value: bytes, revision: int) -> Override:
    """The override at ``key``; StoreDataError if anything in it is not as written."""
    head = overrides_prefix(cluster)
    if not key.startswith(head):
        raise StoreDataError(f"key {key[:80]!r} is not an override of cluster {cluster}")
    try:
        flow = str(Flow.parse(key[len(head) :].decode("ascii")))
    except (UnicodeDecodeError, FlowSyntaxError):
        raise StoreDataError(f"override key {key[:80]!r}: not a flow") from None
    if len(value) > MAX_VALUE:
        raise StoreDataError(f"override of {flow}: {len(value)} bytes, at most {MAX_VALUE}")
    try:
        doc: Any = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise StoreDataError(f"override of {flow}: not msgpack") from None
    if not isinstance(doc, dict) or set(doc) != {"host", "by"}:
        raise StoreDataError(f"override of {flow}: not a map of host and by")
    for field in ("host", "by"):
        if not isinstance(doc[field], str) or not NAME.fullmatch(doc[field]):
            raise StoreDataError(f"override of {flow}: {field} is not a name")
    return Override(flow, doc["host"], doc["by"], revision)


def diversions_prefix(cluster: str) -> bytes:
    return prefix(cluster) + b"diversions/"


def diversion_key(cluster: str, address: str) -> bytes:
    return diversions_prefix(cluster) + str(ipaddress.ip_address(address)).encode()


@dataclass(frozen=True)
class Diversion:
    """New connections to ``address`` (a VIP) go to ``host`` (a drain)."""

    address: str
    host: str
    revision: int = 0

    def encode(self) -> bytes:
        return msgpack.packb({"host": self.host})


def decode_diversion(cluster: str, key: bytes, value: bytes, revision: int) -> Diversion:
    head = diversions_prefix(cluster)
    if not key.startswith(head):
        raise StoreDataError(f"key {key[:80]!r} is not a diversion of cluster {cluster}")
    try:
        address = str(ipaddress.ip_address(key[len(head) :].decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise StoreDataError(f"diversion key {key[:80]!r}: not an address") from None
    if len(value) > MAX_VALUE:
        raise StoreDataError(f"diversion of {address}: {len(value)} bytes, at most {MAX_VALUE}")
    try:
        doc: Any = msgpack.unpackb(value, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise StoreDataError(f"diversion of {address}: not msgpack") from None
    if not isinstance(doc, dict) or set(doc) != {"host"}:
        raise StoreDataError(f"diversion of {address}: not a map of host")
    if not isinstance(doc["host"], str) or not NAME.fullmatch(doc["host"]):
        raise StoreDataError(f"diversion of {address}: host is not a name")
    return Diversion(address, doc["host"], revision)


def admission_key(cluster: str, node: str) -> bytes:
    if not NAME.fullmatch(node):
        raise ValueError(f"invalid node name {node!r}")
    return prefix(cluster) + b"admission/" + node.encode()


def encode_admission(accepting: bool, drained_to: str | None) -> bytes:
    return msgpack.packb({"accepting": accepting, "drained_to": drained_to})


def decode_admission(node: str, value: bytes) -> tuple[bool, str | None]:
    """(accepting, drained_to) of ``node``; StoreDataError if it is not as written."""
    try:
        doc: Any = msgpack.unpackb(value, raw=False) if len(value) <= MAX_VALUE else None
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        doc = None
    if not isinstance(doc, dict) or set(doc) != {"accepting", "drained_to"}:
        raise StoreDataError(f"admission of {node}: not a map of accepting and drained_to")
    accepting, drained_to = doc["accepting"], doc["drained_to"]
    if not isinstance(accepting, bool):
        raise StoreDataError(f"admission of {node}: accepting is not true or false")
    if drained_to is not None and not (isinstance(drained_to, str) and NAME.fullmatch(drained_to)):
        raise StoreDataError(f"admission of {node}: drained_to is not a name")
    return accepting, drained_to
