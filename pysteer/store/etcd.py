"""The shared store's asyncio adapter: etcd's v3 API over gRPC with mutual TLS.

The client is aetcd's, with one change: aetcd 1.0.0 opens only plaintext channels (TLS
is its open issue #37), and a store that decides where every moved flow goes must never
be reachable without a certificate. ``_TlsClient`` opens aetcd's stubs over a
``grpc.aio.secure_channel`` with the node's own certificate; everything else is aetcd.

Every member's certificate carries the name ``etcd`` (as well as its address), so one
name verifies whichever member the channel reaches. Every call has a deadline: with no
quorum, etcd does not answer, and a store that cannot answer is ``StoreUnavailable``
within the timeout, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
from aetcd import exceptions as aetcd_errors
from aetcd import rpc, watcher

from pysteer.store.errors import Conflict, StoreError, StoreUnavailable, WatchGap
from pysteer.store.keys import (
    Diversion,
    Override,
    StoreDataError,
    admission_key,
    decode_admission,
    decode_diversion,
    decode_override,
    diversion_key,
    diversions_prefix,
    encode_admission,
    override_key,
    overrides_prefix,
    prefix,
)

__all__ = ["Change", "Conflict", "Store", "StoreError", "StoreUnavailable", "WatchGap"]

SERVER_NAME = "etcd"  # in every member's certificate
MAX_TXN = 128  # etcd's default limit of operations in one transaction
RETRY_DELAY = 0.05  # seconds between attempts of a call that failed fast


@dataclass(frozen=True)
class Change:
    """One change to an override: ``override`` None means it was removed."""

    flow: str
    override: Override | None
    revision: int


@dataclass(frozen=True)
class StateChange:
    """One change a steering node mirrors: ``kind`` override (``key``: the flow) or
    diversion (``key``: the VIP); ``host`` None: removed."""

    kind: str
    key: str
    host: str | None
    revision: int


class _TlsClient(aetcd.Client):
    """aetcd's client over a TLS channel with a client certificate (see the module)."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials,
        timeout: float,
        server_name: str,
    ) -> None:
        super().__init__(timeout=timeout)  # type: ignore[arg-type]
        self._target, self._credentials = target, credentials
        self._options = {
            "grpc.ssl_target_name_override": server_name,
            "grpc.default_authority": server_name,
            "grpc.enable_retries": 0,
            # A full read of many overrides is one response (100,000 are about 7 MB).
            "grpc.max_receive_message_length": 256 << 20,
        }

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = grpc.aio.secure_channel(
            self._target, self._credentials, options=list(self._options.items())
        )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


def _unavailable(exc: BaseException) -> StoreUnavailable:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return StoreUnavailable(f"etcd: {(text or type(exc).__name__).strip()[:200]}")


class Store:
    """The cluster ``cluster``'s shared state in the etcd members at ``endpoints``."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        cluster: str,
        *,
        ca: bytes,
        cert: bytes,
        key: bytes,
        timeout: float = 2.0,
        server_name: str = SERVER_NAME,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        v6 = [h for h, _ in endpoints if ":" in h]
        if v6 and len(v6) != len(endpoints):
            raise ValueError("etcd endpoints must all be IPv4 or all IPv6")
        scheme = "ipv6" if v6 else "ipv4"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in endpoints)
        self.cluster, self.timeout = cluster, timeout
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        self._client = _TlsClient(f"{scheme}:{hosts}", credentials, timeout, server_name)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, make: Callable[[], Awaitable[Any]], *, write: bool = False) -> Any:
        """One etcd call, bounded: gRPC's deadline per attempt, and this whole call within
        the timeout (plus a second as a fence).

        A quick failure is tried again while time is left: a member that just lost its
        leader answers "leader changed" until the election ends (seen when one of three
        members was killed), and that must change nothing. Every call here is safe to
        repeat (a compare-and-set that did land is then found as its own value).

        A write that got no answer is in doubt, as in any consensus store: it may have
        reached the members that remained and be committed once a quorum returns (seen
        in the three-member test). The error says so; the caller reads the key back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                left = max(deadline - loop.time(), RETRY_DELAY)
                return await asyncio.wait_for(make(), left + 1.0)
            except (TimeoutError, aetcd_errors.ClientError, grpc.RpcError) as exc:
                if not isinstance(exc, TimeoutError) and loop.time() + RETRY_DELAY < deadline:
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                error = _unavailable(exc)
                if write:
                    error = StoreUnavailable(
                        f"{error}; the write may still take effect: read it back"
                    )
                raise error from None

    # --- overrides -----------------------------------------------------------------------
    async def overrides(
        self, bad: Callable[[StoreDataError], None] | None = None
    ) -> tuple[dict[str, Override], int]:
        """Every override, and the store revision they were read at (watch from the next).
        A value that is not as pysteer writes it raises StoreDataError, or with ``bad``
        is given to it and skipped (one bad key must not stop a steering node's load)."""
        result = await self._call(lambda: self._client.get_prefix(overrides_prefix(self.cluster)))
        out = {}
        for kv in result:
            try:
                o = decode_override(self.cluster, kv.key, kv.value, kv.mod_revision)
            except StoreDataError as exc:
                if bad is None:
                    raise
                bad(exc)
                continue
            out[o.flow] = o
        return out, int(result.header.revision)

    async def get_override(self, flow: str) -> Override | None:
        result = await self._call(lambda: self._client.get(override_key(self.cluster, flow)))
        if result is None:
            return None
        return decode_override(self.cluster, result.key, result.value, result.mod_revision)

    async def put_override(self, override: Override, *, expect: int | None) -> int:
        """Write ``override`` if the flow's version is still ``expect`` (0: no override;
        None: whatever it is). Returns the new version; Conflict when it changed."""
        key = override_key(self.cluster, override.flow)
        tx = self._client.transactions
        compare = [] if expect is None else [tx.mod(key) == expect]
        ok, responses = await self._call(
            lambda: self._client.transaction(
                compare=compare, success=[tx.put(key, override.encode())], failure=[tx.get(key)]
            ),
            write=True,
        )
        if not ok:
            current = None
            if responses and responses[0]:
                value, meta = responses[0][0]
                current = decode_override(self.cluster, key, value, meta.mod_revision)
            seen = current.revision if current else 0
            raise Conflict(
                f"override of {override.flow} is at version {seen}, not {expect}", current
            )
        return int(responses[0].response_put.header.revision)

    async def delete_override(
        self, flow: str, *, expect: int | None = None, value: Override | None = None
    ) -> bool:
        """Remove the flow's override (if still at version ``expect``, or still exactly
        ``value``: what its writer knows without reading it back); whether it was."""
        key = override_key(self.cluster, flow)
        tx = self._client.transactions
        compare = [] if expect is None else [tx.mod(key) == expect]
        if value is not None:
            compare.append(tx.value(key) == value.encode())
        ok, responses = await self._call(
            lambda: self._client.transaction(compare=compare, success=[tx.delete(key)], failure=[]),
            write=True,
        )
        return bool(ok and responses and responses[0].response_delete_range.deleted)

    # --- diversions (a drain's) ---------------------------------------------------------
    async def put_diversion(self, address: str, host: str) -> int:
        """New connections to ``address`` go to ``host``; returns the store revision."""
        key = diversion_key(self.cluster, address)
        result = await self._call(
            lambda: self._client.put(key, Diversion(address, host).encode()), write=True
        )
        return int(result.header.revision) if hasattr(result, "header") else 0

    async def delete_diversion(self, address: str) -> bool:
        key = diversion_key(self.cluster, address)
        result = await self._call(lambda: self._client.delete(key), write=True)
        return bool(result)

    # --- a node's admission (cordon, drain) ---------------------------------------------
    async def put_admission(self, node: str, accepting: bool, drained_to: str | None) -> None:
        key = admission_key(self.cluster, node)
        value = encode_admission(accepting, drained_to)
        await self._call(lambda: self._client.put(key, value), write=True)

    async def get_admission(self, node: str) -> tuple[bool, str | None] | None:
        result = await self._call(lambda: self._client.get(admission_key(self.cluster, node)))
        return None if result is None else decode_admission(node, result.value)

    # --- everything at once: what a steering node mirrors ------------------------------
    async def state(
        self, bad: Callable[[StoreDataError], None] | None = None
    ) -> tuple[dict[str, Override], dict[str, Diversion], int]:
        """Every override and diversion, read at one revision (watch from the next)."""
        result = await self._call(lambda: self._client.get_prefix(prefix(self.cluster)))
        overrides, diversions = {}, {}
        for kv in result:
            try:
                entry = self._decode(kv.key, kv.value, kv.mod_revision)
            except StoreDataError as exc:
                if bad is None:
                    raise
                bad(exc)
                continue
            if isinstance(entry, Override):
                overrides[entry.flow] = entry
            elif isinstance(entry, Diversion):
                diversions[entry.address] = entry
        return overrides, diversions, int(result.header.revision)

    def _decode(self, key: bytes, value: bytes, revision: int) -> Override | Diversion | None:
        if key.startswith(overrides_prefix(self.cluster)):
            return decode_override(self.cluster, key, value, revision)
        if key.startswith(diversions_prefix(self.cluster)):
            return decode_diversion(self.cluster, key, value, revision)
        return None  # another kind of key: not a steering node's

    async def watch_state(self, start_revision: int) -> AsyncIterator[StateChange]:
        """Every change to overrides and diversions from ``start_revision`` on, in order;
        WatchGap as ``watch_overrides``."""
        head = prefix(self.cluster)
        async with contextlib.aclosing(self._events(head, start_revision)) as events:
            async for event in events:
                kv = event.kv
                if kv.key.startswith(overrides_prefix(self.cluster)):
                    kind = "override"
                elif kv.key.startswith(diversions_prefix(self.cluster)):
                    kind = "diversion"
                else:
                    continue
                name = kv.key[len(head) :].split(b"/", 1)[1].decode("ascii", "replace")
                if event.kind == aetcd.EventKind.DELETE:
                    yield StateChange(kind, name, None, kv.mod_revision)
                    continue
                entry = self._decode(kv.key, kv.value, kv.mod_revision)
                assert entry is not None  # noqa: S101
                yield StateChange(kind, name, entry.host, kv.mod_revision)

    async def _events(self, head: bytes, start_revision: int) -> AsyncIterator[Any]:
        """etcd's events under ``head`` from ``start_revision`` on; WatchGap when the
        history from there is gone (compacted) or the watch broke."""
        try:
            watch = await self._call(
                lambda: self._client.watch_prefix(head, start_revision=start_revision)
            )
        except StoreUnavailable as exc:
            raise WatchGap(str(exc)) from None
        try:
            async for event in watch:
                yield event
        except aetcd_errors.RevisionCompactedError as exc:
            raise WatchGap(f"etcd history compacted: {exc}") from None
        except (aetcd_errors.ClientError, grpc.RpcError) as exc:
            raise WatchGap(str(_unavailable(exc))) from None
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def watch_overrides(self, start_revision: int) -> AsyncIterator[Change]:
        """Every change to the overrides from ``start_revision`` on, in order. WatchGap
        when history from there is gone (compacted) or the watch broke: read
        ``overrides()`` again and watch from its revision + 1."""
        head = overrides_prefix(self.cluster)
        async with contextlib.aclosing(self._events(head, start_revision)) as events:
            async for event in events:
                kv = event.kv
                flow = kv.key[len(head) :].decode("ascii", "replace")
                if event.kind == aetcd.EventKind.DELETE:
                    yield Change(flow, None, kv.mod_revision)
                else:
                    o = decode_override(self.cluster, kv.key, kv.value, kv.mod_revision)
                    yield Change(o.flow, o, kv.mod_revision)

    async def put_many(self, overrides: Sequence[Override]) -> int:
        """Write up to MAX_TXN overrides in one transaction, whatever their versions (a
        resync, or a bulk load); returns the store revision after it."""
        if len(overrides) > MAX_TXN:
            raise ValueError(f"at most {MAX_TXN} overrides in one transaction")
        tx = self._client.transactions
        puts = [tx.put(override_key(self.cluster, o.flow), o.encode()) for o in overrides]
        _, responses = await self._call(
            lambda: self._client.transaction(compare=[], success=puts, failure=[]), write=True
        )
        return int(responses[-1].response_put.header.revision) if responses else 0

    async def delete_all_overrides(self) -> int:
        """Remove every override of the cluster; how many there were."""
        result = await self._call(
            lambda: self._client.delete_prefix(overrides_prefix(self.cluster)), write=True
        )
        return int(result.deleted)

    # --- upkeep ----------------------------------------------------------------------------
    async def compact(self, revision: int) -> None:
        await self._call(lambda: self._client.compact(revision, physical=True))

    async def leader(self) -> int:
        """The answering member's leader (0: it has none, so nothing can be written or
        read linearizably: the cluster lost its quorum)."""
        c = self._client

        async def status() -> Any:  # aetcd's status() also lists the members: not that
            return await c.maintenancestub.Status(
                rpc.StatusRequest(), timeout=c._timeout, metadata=c.metadata
            )

        return int((await self._call(status)).leader)

    async def db_size(self) -> int:
        """The size of the database file of the member that answers, in bytes."""
        return int((await self._call(self._client.status)).db_size)

    async def defragment(self) -> None:
        """Give the space compaction freed back to the file system (the answering member)."""
        await self._call(self._client.defragment)
