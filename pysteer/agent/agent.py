"""The agent: one per host. It serves the app runtime and moves connections.

Three doors, one asyncio loop:
- the app's listeners on the VIP (``pysteer.app.runtime``);
- the peer listener on the node's control address: mutual TLS, cluster CA only, msgpack
  frames (``hello``, ``prepare``, ``commit``, ``abort``, ``outcome``);
- the local control socket, mode 0600, JSON lines for the CLI (``flows``, ``status``,
  ``migrate``, ``cordon``, ``uncordon``, ``migrations``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysteer import tcp
from pysteer.agent.drain import Drain, DrainError
from pysteer.agent.frames import FrameError, read_frame, write_frame
from pysteer.agent.links import LinkError, LinkPool, PeerLink, Refused, SteerLink
from pysteer.agent.migrate import Migration
from pysteer.app.runtime import Exported, Runtime, Service
from pysteer.cluster.config import ClusterConfig
from pysteer.metrics import AgentMetrics, setup_logging
from pysteer.metrics import serve as serve_metrics
from pysteer.steer.control import client_context, server_context
from pysteer.steer.flow import Flow, FlowSyntaxError
from pysteer.tls import ServerConfig
from pysteer.transfer.blob import KEY_LEN, BlobError, ImportLedger, MigrationBlob, open_sealed

log = logging.getLogger("pysteer.agent")

LINKS = 16  # mTLS links per peer (and to the steering node): migrations in flight at once
MAX_BLOB_AGE = 60.0  # seconds: an older blob is stale (and a replay, whatever the ledger says)
RUN_DIR = Path("/run/pysteer")
# What the CLI may ask over the peer listener (a drain streams: run it on the source node).
REMOTE_COMMANDS = ("flows", "status", "migrate", "migrations", "cordon", "uncordon", "undrain")


class AgentError(RuntimeError):
    """The agent cannot start; the message says why."""


def control_path(cluster: str, node: str) -> Path:
    return RUN_DIR / cluster / f"agent-{node}.sock"


def read_cluster_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read the cluster key {path}: {exc.strerror}") from None
    if len(key) != KEY_LEN:
        raise AgentError(f"the cluster key {path} must be {KEY_LEN} bytes, not {len(key)}")
    return key


def _service_tls(svc: Any) -> ServerConfig | None:
    if not svc.tls:
        return None
    try:
        return ServerConfig(svc.cert.read_bytes(), svc.key.read_bytes())
    except OSError as exc:
        raise AgentError(
            f"service {svc.port}: cannot read {exc.filename}: {exc.strerror}"
        ) from None


@dataclass
class _Prepared:
    sock: socket.socket
    blob: MigrationBlob


_handshakes: set[asyncio.Task] = set()


class _Held(asyncio.Protocol):
    """Holds a new connection unread until its TLS handshake starts (no byte is lost)."""

    def __init__(self, start: Any) -> None:
        self._start = start

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._start(transport))
        _handshakes.add(task)
        task.add_done_callback(_handshakes.discard)


class Agent:
    def __init__(
        self,
        config: ClusterConfig,
        node: str,
        *,
        fault: str | None = None,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        self.config = config
        self.name = node
        me = config.node(node)
        self.me = me
        self.cluster_key = read_cluster_key(config.cluster_key)
        services = [Service(s.port, s.app, _service_tls(s)) for s in config.services.values()]
        self.runtime = Runtime(services, [str(v) for v in config.vips])
        self.ledger = ImportLedger()
        self.prepared: dict[bytes, _Prepared] = {}
        self.in_doubt: dict[str, Exported] = {}
        self.accepting = True
        self.drained_to: str | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=1000)
        self.started = time.time()
        self.fault = fault  # test hook: PYSTEER_FAULT (see tests/integration/test_migrate_*)
        try:
            self.server_tls = server_context(me.cert, me.key, config.ca)
            client_tls = client_context(me.cert, me.key, config.ca)
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(f"node {node}: cannot load its certificate or the CA: {exc}") from None
        self.peers = {
            n: LinkPool(functools.partial(PeerLink, n, c.control, client_tls), size=LINKS)
            for n, c in config.nodes.items() if n != node
        }  # fmt: skip
        steer = config.steer
        self.steer = LinkPool(
            functools.partial(SteerLink, steer.name, steer.control, client_tls), size=LINKS
        )
        self._moving: set[Flow] = set()
        self._stop = asyncio.Event()
        self.control_path = control_path(config.name, node)
        self.metrics: AgentMetrics | None = None
        if metrics is not None:
            self.metrics = AgentMetrics(node, lambda: len(self.runtime.connections))
            self._metrics_listen = metrics

    # --- lifecycle -------------------------------------------------------------------------
    async def serve(self) -> None:
        try:
            await self.runtime.start()
        except OSError as exc:
            raise AgentError(f"cannot serve the VIP: {exc.strerror or exc}") from None
        host, port = self.me.control
        loop = asyncio.get_running_loop()
        try:
            peer_server = await loop.create_server(lambda: _Held(self._peer_tls), host, port)
        except OSError as exc:
            raise AgentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        if self.metrics is not None:
            try:
                serve_metrics(self.metrics.registry, self._metrics_listen)
            except OSError as exc:
                raise AgentError(f"cannot serve metrics: {exc.strerror or exc}") from None
        self.control_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        old = os.umask(0o177)
        try:
            control_server = await asyncio.start_unix_server(self._control, self.control_path)
        finally:
            os.umask(old)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("agent %s: serving %s on %s; peers at %s:%d; control at %s", self.name,
                 sorted(self.runtime.services), ", ".join(self.runtime.addresses), host, port,
                 self.control_path)  # fmt: skip
        try:
            await self._stop.wait()
        finally:
            peer_server.close()
            control_server.close()
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()
            for prepared in self.prepared.values():
                tcp.release(prepared.sock)
            await self.runtime.close()

    # --- peers (mTLS) ----------------------------------------------------------------------
    async def _peer_tls(self, transport: asyncio.Transport) -> None:
        """The TLS handshake of a peer connection, logged when it fails."""
        loop = asyncio.get_running_loop()
        addr = transport.get_extra_info("peername")
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            tls = await loop.start_tls(transport, protocol, self.server_tls, server_side=True,
                                       ssl_handshake_timeout=10)  # fmt: skip
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log.warning("refused a peer connection from %s: %s", addr and addr[0], reason)
            transport.close()
            return
        protocol.connection_made(tls)
        await self._peer(reader, asyncio.StreamWriter(tls, protocol, reader, loop))

    async def _peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        cert = writer.get_extra_info("peercert") or {}
        who = dict(x[0] for x in cert.get("subject", ())).get("commonName", "")
        if who not in self.config.nodes:
            log.warning("refused a peer connection from %s: %r is not a node", addr[0], who)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mine: set[bytes] = set()
        try:
            while True:
                request = await read_frame(reader)
                answer = await self._peer_op(who, request, mine)
                await write_frame(writer, answer)
        except (FrameError, OSError):
            pass
        finally:
            for mid in mine & set(self.prepared):  # A is gone before its commit: abort
                self._abort(mid, f"connection from {who} lost")
            writer.close()

    async def _peer_op(self, who: str, req: dict[str, Any], mine: set[bytes]) -> dict[str, Any]:
        op = req.get("op")
        if op == "control":  # the CLI from another machine, with a cluster certificate
            return await self._remote_control(who, req.get("request"))
        if op == "hello":
            return {"ok": True, "node": self.name, "accepting": self.accepting,
                    "services": sorted(self.runtime.services)}  # fmt: skip
        mid = req.get("id")
        if not isinstance(mid, bytes) or len(mid) != 16:
            return {"ok": False, "error": f"{op!r} needs a 16-byte migration id"}
        if op == "prepare":
            return await self._prepare(who, mid, req.get("blob"), mine)
        handler = {"commit": self._commit, "abort": self._abort_op, "outcome": self._outcome}
        if op not in handler:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return handler[op](who, mid)

    async def _remote_control(self, who: str, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or request.get("cmd") not in REMOTE_COMMANDS:
            return {"ok": False, "error": f"remote commands: {', '.join(REMOTE_COMMANDS)}"}
        log.info("remote %s from %s", request["cmd"], who)
        return await self._control_op(request)

    def _abort_op(self, who: str, mid: bytes) -> dict[str, Any]:
        entry = self.prepared.get(mid)
        if entry is None and self.ledger.outcome(mid) == "committed":
            return {"ok": False, "error": "already committed"}
        if entry is not None:
            self._abort(mid, f"aborted by {who}")
        return {"ok": True}

    def _outcome(self, _who: str, mid: bytes) -> dict[str, Any]:
        return {"ok": True, "outcome": self.ledger.outcome(mid)}

    async def _prepare(self, who: str, mid: bytes, data: Any, mine: set[bytes]) -> dict[str, Any]:
        short = mid.hex()[:12]
        if not self.accepting:
            return {"ok": False, "error": "not accepting imports (cordoned)"}
        if not isinstance(data, bytes):
            return {"ok": False, "error": "prepare needs a sealed blob"}
        try:
            blob = open_sealed(data, self.cluster_key, expect_id=mid)
            if abs(time.time() - blob.t) > MAX_BLOB_AGE:
                raise BlobError(f"stale blob ({time.time() - blob.t:.0f} s old)")
            self.ledger.claim(mid)
        except BlobError as exc:
            log.warning("import %s from %s refused: %s", short, who, exc)
            self._count_import("refused")
            return {"ok": False, "error": str(exc)}
        if blob.flow.dport not in self.runtime.services:
            self.ledger.decide(mid, "aborted")
            return {"ok": False, "error": f"port {blob.flow.dport} is not served here"}
        if self.fault == "prepare:exit":
            os._exit(70)  # test hook: die mid-import, before restoring anything
        if self.fault == "prepare:stall":
            await asyncio.sleep(3600)
        try:
            sock = tcp.restore(blob.tcp, frozen=True)
        except tcp.RepairError as exc:
            self.ledger.decide(mid, "aborted")
            log.warning("import %s from %s: restore failed: %s", short, who, exc)
            return {"ok": False, "error": f"restore failed on {self.name}: {exc}"}
        self.prepared[mid] = _Prepared(sock, blob)
        mine.add(mid)
        if self.fault == "prepared:exit":
            os._exit(71)  # test hook: die holding a frozen socket, before answering
        return {"ok": True}

    def _commit(self, _who: str, mid: bytes) -> dict[str, Any]:
        entry = self.prepared.pop(mid, None)
        if entry is None:
            outcome = self.ledger.outcome(mid)
            if outcome == "committed":
                return {"ok": True}
            return {"ok": False, "error": f"nothing prepared for this id ({outcome or 'unknown'})"}
        blob = entry.blob
        try:
            tcp.thaw(entry.sock, blob.tcp)
        except tcp.RepairError as exc:
            self._abort_entry(mid, entry, f"thaw failed: {exc}")
            return {"ok": False, "error": f"thaw failed on {self.name}: {exc}"}
        self.ledger.decide(mid, "committed")
        self._count_import("committed")
        exported = Exported(entry.sock, blob.tcp, blob.tls, blob.app, blob.out, blob.flow.dport, {})
        self.runtime.adopt_socket(entry.sock, exported)
        log.info("import %s: %s now served here", mid.hex()[:12], blob.flow)
        return {"ok": True}

    def _abort(self, mid: bytes, why: str) -> None:
        entry = self.prepared.pop(mid, None)
        if entry is not None:
            self._abort_entry(mid, entry, why)

    def _abort_entry(self, mid: bytes, entry: _Prepared, why: str) -> None:
        with contextlib.suppress(tcp.RepairError, OSError):
            tcp.release(entry.sock)
        self.ledger.decide(mid, "aborted")
        self._count_import("aborted")
        log.warning("import %s of %s aborted: %s", mid.hex()[:12], entry.blob.flow, why)

    def _count_import(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.imported(outcome)

    # --- local control (unix socket, 0600) ---------------------------------------------------
    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError
                except ValueError:
                    answer = {"ok": False, "error": "requests are one JSON object per line"}
                else:
                    if req.get("cmd") == "drain":
                        await self._drain(req, reader, writer)
                        continue
                    answer = await self._control_op(req)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()

    async def _control_op(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911 - dispatch
        cmd = req.get("cmd")
        if cmd == "flows":
            flows = [c.describe() | {"node": self.name} for c in self.runtime.connections.values()]
            return {"ok": True, "flows": flows}
        if cmd == "status":
            return {"ok": True, "status": await self.status()}
        if cmd == "migrations":
            return {"ok": True, "migrations": list(self.history)}
        if cmd == "undrain":
            return await self._undrain()
        if cmd in ("cordon", "uncordon"):
            self.accepting = cmd == "uncordon"
            return {"ok": True, "accepting": self.accepting}
        if cmd == "migrate":
            return await self._migrate(req)
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def _migrate(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911 - checks
        try:
            flow = Flow.parse(str(req.get("flow", "")))
        except FlowSyntaxError as exc:
            return {"ok": False, "error": str(exc)}
        target = str(req.get("to", ""))
        timeout = req.get("timeout_s", 5.0)
        if not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            return {"ok": False, "error": "timeout must be a number of seconds in (0, 600]"}
        if target == self.name:
            return {"ok": False, "error": f"flow {flow} is already on {target}"}
        if target not in self.peers:
            known = ", ".join(sorted(self.config.nodes))
            return {"ok": False, "error": f"unknown node {target!r} (nodes: {known})"}
        if self.runtime.find(flow) is None:
            return {"ok": False, "error": f"flow {flow} is not served on {self.name}"}
        if flow in self._moving:
            return {"ok": False, "error": f"flow {flow} is already moving"}
        return {"ok": True, "migration": await self.migrate_flow(flow, target, float(timeout))}

    async def migrate_flow(self, flow: Flow, target: str, timeout: float, *,
                           checked: bool = False) -> dict[str, Any]:  # fmt: skip
        """Move one flow (checked by the caller); returns the report, kept in the history."""
        return await self.run_migration(Migration(self, flow, target, timeout, checked=checked))

    async def run_migration(self, migration: Migration) -> dict[str, Any]:
        self._moving.add(migration.flow)
        try:
            report = await migration.run()
        finally:
            self._moving.discard(migration.flow)
        result = report.to_json()
        self.history.append(result)
        if self.metrics is not None:
            self.metrics.migration(result)
        return result

    async def _drain(self, req: dict[str, Any], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:  # fmt: skip
        """A drain streams progress lines, then its summary; any line from the client (or
        its hanging up) stops it after the batch in flight."""

        async def send(message: dict[str, Any]) -> None:
            try:
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()
            except (ConnectionError, OSError):
                stop.set()

        target, batch, timeout = req.get("to"), req.get("batch", 32), req.get("timeout_s", 5.0)
        error = None
        if target not in self.peers:
            error = f"cannot drain {self.name} to {target!r}" + (
                " (itself)" if target == self.name else f" (nodes: {', '.join(self.peers)})"
            )
        elif not isinstance(batch, int) or not 1 <= batch <= 4096:
            error = "batch must be 1..4096"
        elif not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            error = "timeout must be a number of seconds in (0, 600]"
        stop = asyncio.Event()
        if error:
            await send({"ok": False, "error": error})
            return
        drain = Drain(self, str(target), batch, float(timeout), stop=stop,
                      progress=lambda counts: send({"ok": True, "progress": counts}))  # fmt: skip
        try:
            await drain.start()
        except DrainError as exc:
            await send({"ok": False, "error": str(exc)})
            return

        async def watch() -> None:
            with contextlib.suppress(OSError, ValueError):
                await reader.readline()
            stop.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            summary = await drain.run()
        finally:
            watcher.cancel()
        log.info("drain %s -> %s%s: %d moved, %d rolled back, %d failed, %d still here",
                 self.name, target, " (interrupted)" if summary["interrupted"] else "",
                 summary["moved"], summary["rolled_back"], summary["failed"],
                 len(summary["remaining"]))  # fmt: skip
        await send({"ok": True, "drain": summary})

    async def _undrain(self) -> dict[str, Any]:
        try:
            for vip in self.runtime.addresses:
                await self.steer.call(5.0, cmd="divert", address=vip, host=None)
        except (LinkError, Refused) as exc:
            return {"ok": False, "error": f"steering node: {exc}"}
        self.accepting, self.drained_to = True, None
        return {"ok": True}

    async def status(self) -> dict[str, Any]:
        try:
            stats = await self.steer.call(2.0, cmd="stats")
            steer = {"reachable": True, "stats": stats.get("stats")}
        except (LinkError, Refused) as exc:
            steer = {"reachable": False, "error": str(exc)}
        return {
            "steer": steer,
            "node": self.name,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "accepting": self.accepting,
            "drained_to": self.drained_to,
            "services": {
                str(p): {"app": s.app, "tls": s.tls is not None}
                for p, s in self.runtime.services.items()
            },
            "vips": self.runtime.addresses,
            "control": f"{self.me.control[0]}:{self.me.control[1]}",
            "connections": len(self.runtime.connections),
            "prepared": len(self.prepared),
            "in_doubt": sorted(self.in_doubt),
            "migrations": {
                o: sum(1 for m in self.history if m["outcome"] == o)
                for o in {m["outcome"] for m in self.history}
            },
        }


def run(config: ClusterConfig, node: str, *, metrics: tuple[str, int] | None = None,
        log_json: bool = False) -> int:  # fmt: skip
    """``pysteer agent run``: serve until SIGTERM."""
    setup_logging(log_json)
    agent = Agent(config, node, fault=os.environ.get("PYSTEER_FAULT"), metrics=metrics)
    asyncio.run(agent.serve())
    return 0
