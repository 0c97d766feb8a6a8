"""The agent: one per host. It serves the app runtime and moves connections.

Three doors, one asyncio loop:
- the app's listeners on the VIP (``pysteer.app.runtime``);
- the peer listener on the node's control address: mutual TLS, cluster CA only, pysteer's
  RPC (``pysteer.rpc``) with ops ``hello``, ``prepare``, ``commit``, ``abort``,
  ``outcome``, ``control``;
- the local control socket, mode 0600, the same RPC for the CLI (``flows``, ``status``,
  ``migrate``, ``drain``, ``cordon``, ``uncordon``, ``undrain``, ``migrations``,
  ``resolve``).

Beside them it keeps the steering node true to what it serves: it reports the
connections it closes (their entries go) and, on start, after the steering daemon
restarts and every ``sync_interval``, lists every flow it serves (``sync``).

Signals: SIGTERM (and SIGINT) drain to the node's ``drain_to`` (cluster file), bounded by
``drain_timeout``, then close what is left with a close_notify and a FIN, and log both
counts. SIGHUP reloads the node's certificate and key and the CA named by the cluster
file (not the service certificate: restart for that); it never stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import signal
import socket
import ssl
import time
from collections import deque
from pathlib import Path
from typing import Any

from pysteer import __version__
from pysteer.agent.admission import Admission, admission_path
from pysteer.agent.admission import load as load_admission
from pysteer.agent.batcher import MAX_ITEMS as MAX_BATCH
from pysteer.agent.batcher import Batcher
from pysteer.agent.drain import Drain, DrainError
from pysteer.agent.imports import Imports
from pysteer.agent.ledger import Ledger
from pysteer.agent.links import LinkError, LinkPool, PeerLink, Refused, SteerLink
from pysteer.agent.migrate import Migration, Node
from pysteer.agent.notices import Notifier
from pysteer.agent.overrides import OverrideKeeper, StoreRefused
from pysteer.agent.steer_group import SteerGroup
from pysteer.agent.steering import Steering
from pysteer.app.handlers import HandlerError
from pysteer.app.runtime import Connection, Runtime, Service
from pysteer.cluster.config import ClusterConfig, ConfigError, NodeConfig, load_config
from pysteer.flow import Flow, FlowSyntaxError
from pysteer.identity import IdentityError, client_context, peer_node, server_context
from pysteer.metrics import AgentMetrics, setup_logging
from pysteer.metrics import serve as serve_metrics
from pysteer.paths import RUN_DIR
from pysteer.rpc import aio
from pysteer.rpc.errors import ProtocolError
from pysteer.store.errors import StoreError
from pysteer.tls import ServerConfig
from pysteer.transfer.blob import KEY_LEN, worker_of

log = logging.getLogger("pysteer.agent")

LINKS = 16  # mTLS links per peer (and to the steering node): migrations in flight at once
# What the CLI may ask over the peer listener (a drain streams: run it on the source node).
REMOTE_COMMANDS = (
    "flows",
    "status",
    "migrate",
    "migrations",
    "resolve",
    "cordon",
    "uncordon",
    "undrain",
)
GC_THRESHOLDS = (50_000, 50, 100)  # gc.set_threshold: see run()
FREEZE_SLOTS = 8  # flows this agent's migrations hold frozen at once (see Migration._run)
CLAIM_PATIENCE = 4.0  # seconds a commit waits on the steering node before answering "pending"
SWEEP_FIRST = 5.0  # seconds after the start: the first sweep of stale overrides
SWEEP_INTERVAL = 300.0  # then this often (a full read: 1 s for 100,000 overrides)
MAX_CLOSED = 100_000  # close notices kept while the steering node is unreachable
MAX_CONTROL_REQUEST = 64 << 10  # bytes of a request on the local control socket
MIN_TIMEOUT = 0.1  # seconds: a move's budget below this could only time out and roll back


class AgentError(RuntimeError):
    """The agent cannot start; the message says why."""


def control_path(cluster: str, node: str, worker: int | None = None) -> Path:
    """The local control socket of ``node``'s agent, or of one of its workers (which only
    its supervisor uses)."""
    suffix = "" if worker is None else f".w{worker}"
    return RUN_DIR / cluster / f"agent-{node}{suffix}.sock"


def ledger_path(cluster: str, node: str, worker: int | None, workers: int) -> Path:
    """A worker's ledger names the worker count too: with another count, ids route to other
    workers, and fresh ledgers (fresh epochs) refuse every blob sealed before."""
    if worker is None:
        return RUN_DIR / cluster / f"ledger-{node}.log"
    return RUN_DIR / cluster / f"ledger-{node}.w{worker}of{workers}.log"


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
    # An HTTP/1.1 proxy says so in ALPN: a client that offers h2 and http/1.1 knows.
    http = svc.proxy is not None and svc.proxy.protocol == "http/1.1"
    try:
        return ServerConfig(
            svc.cert.read_bytes(), svc.key.read_bytes(), alpn=("http/1.1",) if http else ()
        )
    except OSError as exc:
        raise AgentError(
            f"service {svc.port}: cannot read {exc.filename}: {exc.strerror}"
        ) from None


class _Held(asyncio.Protocol):
    """Holds a new connection unread until its TLS handshake starts (no byte is lost)."""

    def __init__(self, start: Any, tasks: set[asyncio.Task]) -> None:
        self._start, self._tasks = start, tasks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._start(transport))
        self._tasks.add(task)  # kept referenced until done
        task.add_done_callback(self._tasks.discard)


class Agent:
    def __init__(
        self,
        config: ClusterConfig,
        node: str,
        *,
        metrics: tuple[str, int] | None = None,
        sync_interval: float = 30.0,
        worker: int | None = None,
    ) -> None:
        """``worker``: this is worker I of the node's ``workers`` (under a supervisor, which
        keeps the steering node's table in sync and serves the CLI); None: the only one."""
        self.config = config
        self.name = node
        me = config.node(node)
        self.me = me
        self.worker = worker
        self.peer_address = me.worker_control(worker or 0)
        self.cluster_key = read_cluster_key(config.cluster_key)
        services = [
            Service(s.port, s.app, _service_tls(s), proxy=s.proxy) for s in config.services.values()
        ]
        self.runtime = Runtime(services, [str(v) for v in config.vips], shared=worker is not None)
        self.runtime.on_close = self._on_closed
        self.runtime.on_open = self._on_opened
        self.ledger = Ledger(ledger_path(config.name, node, worker, me.workers))
        self.inflight: dict[str, Migration] = {}
        self.in_doubt: dict[str, tuple[Migration, asyncio.Task]] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=1000)
        self.started = time.time()
        self.sync_interval = sync_interval
        self._load_tls()
        self.peers = {
            n: [
                LinkPool(functools.partial(self._peer_link, n, c.worker_control(i)), size=LINKS)
                for i in range(c.workers)
            ]
            for n, c in config.nodes.items()
            if n != node
        }
        self.steering = Steering(  # every steering node, asked at once
            config.steers,
            self._steer_pool,
            host=node,
            served=self._served,
            interval=sync_interval,
        )
        self._moving: set[Flow] = set()
        self.node = Node(
            node,
            self.runtime,
            self.cluster_key,
            self.steering.group,
            self.peers,
            asyncio.Semaphore(FREEZE_SLOTS),
            self.steering.batch,
            {n: [Batcher(p, "op") for p in pools] for n, pools in self.peers.items()},
            worker=worker or 0,
            workers=me.workers,
            admission_file=admission_path(config.name, node),
        )
        admission = load_admission(self.node.admission_file)
        self.node.accepting, self.node.drained_to = admission.accepting, admission.drained_to
        self.imports = Imports(self.node, self.ledger, self._count_import)
        self._tasks: set[asyncio.Task] = set()
        self._handshakes: set[asyncio.Task] = set()
        members = lambda: {n: m.pool for n, m in self.steering.members.items()}  # noqa: E731
        self._closed = Notifier("closed", node, members, MAX_CLOSED)
        self._opened = Notifier("opened", node, members, MAX_CLOSED)
        self._stop = asyncio.Event()
        self._stop_signal: str | None = None
        self.control_path = control_path(config.name, node, worker)
        self.metrics: AgentMetrics | None = None
        if metrics is not None:
            self.metrics = AgentMetrics(
                node,
                lambda: len(self.runtime.connections),
                accepting=lambda: self.accepting,
                drained=lambda: self.drained_to is not None,
                in_doubt=lambda: len(self.in_doubt),
                certificates={"node": me.cert, "ca": config.ca},
            )
            self._metrics_listen = metrics

    @property
    def _worker_name(self) -> str:
        return f"agent {self.name} worker {self.worker}/{self.me.workers}"

    @property
    def accepting(self) -> bool:
        return self.node.accepting

    @property
    def drained_to(self) -> str | None:
        return self.node.drained_to

    # --- TLS (reloaded on SIGHUP) ------------------------------------------------------------
    def _load_tls(self, config: ClusterConfig | None = None) -> None:
        config = config or self.config
        me = config.node(self.name)
        try:
            server = server_context(me.cert, me.key, config.ca)
            client = client_context(me.cert, me.key, config.ca)
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(
                f"node {self.name}: cannot load its certificate or the CA: {exc}"
            ) from None
        self.server_tls, self.client_tls = server, client

    def _peer_link(self, name: str, address: tuple[str, int]) -> PeerLink:
        return PeerLink(name, address, self.client_tls, self.config.names())

    @property
    def steer(self) -> SteerGroup:
        return self.steering.group

    def _steer_pool(self, spec: NodeConfig) -> LinkPool:
        return LinkPool(functools.partial(self._steer_link, spec.name, spec.control), size=LINKS)

    def _steer_link(self, name: str, address: tuple[str, int]) -> SteerLink:
        return SteerLink(name, address, self.client_tls, self.config.names())

    def reload(self) -> None:
        """SIGHUP: read the cluster file again and load its certificates and keys. Links
        opened from now on use them; nothing is closed. A bad file keeps the old ones."""
        try:
            config = load_config(self.config.path)
            self._load_tls(config)
        except (ConfigError, AgentError) as exc:
            log.error("reload refused, keeping the current certificates: %s", exc)
            return
        log.info("reloaded the certificates of %s and the CA from %s", self.name, self.config.path)
        self._reload_steering(config)

    def _reload_steering(self, config: ClusterConfig) -> None:
        """A steering node added to or removed from the file: asked from now on, or not."""
        self.config = dataclasses.replace(
            self.config, steer=config.steer, more_steers=config.more_steers
        )
        changes = self.steering.update(config.steers)
        if changes:
            self.node.steer, self.node.steer_batch = self.steering.group, self.steering.batch
            log.info(
                "steering nodes: %s; now %s", ", ".join(changes), ", ".join(self.steering.members)
            )

    # --- lifecycle -------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_store(self) -> None:
        """The shared store, before any peer can reach us: this node's admission first."""
        keeper = self.node.overrides = self._open_store()
        keeper.start()
        if keeper.enabled and self.worker is None:  # workers: see _sweep
            await self._admission_from_store()
            self._spawn(self._sweep())

    async def serve(self) -> None:
        await self._start_store()
        if not self.accepting:  # kept from before a restart (pysteer.agent.admission)
            log.warning(
                "%s is %s, as it was before this start: it takes no import until `pysteer %s`",
                self.name,
                Admission(self.accepting, self.drained_to).describe(),
                "undrain" if self.drained_to else "uncordon",
            )
        for port, service in sorted(self.runtime.services.items()):
            try:  # an app that cannot be loaded is said now, not at the first client
                service.handler_class()
            except HandlerError as exc:
                raise AgentError(f"service {port}: {exc}") from None
        try:
            await self.runtime.start()
        except OSError as exc:
            raise AgentError(f"cannot serve the VIP: {exc.strerror or exc}") from None
        host, port = self.peer_address
        loop = asyncio.get_running_loop()
        try:
            peer_server = await loop.create_server(
                lambda: _Held(self._peer_tls, self._handshakes), host, port, reuse_address=True
            )
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # not asyncio's wrapping
            raise AgentError(f"cannot listen on {host}:{port}: {why}") from None
        if self.metrics is not None:
            try:
                serve_metrics(self.metrics.registry, self._metrics_listen)
            except OSError as exc:
                raise AgentError(f"cannot serve metrics: {exc.strerror or exc}") from None
        control_server = await aio.serve_unix(self.control_path, self._control)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.worker is None:  # a supervisor syncs for all its workers
            self.steering.reconcile(self._spawn)
        self._spawn(self._closed.run(self._stop))
        self._spawn(self._opened.run(self._stop))
        log.info(
            "%s: serving %s on %s; peers at %s:%d; %s %s",
            f"agent {self.name}" if self.worker is None else self._worker_name,
            sorted(self.runtime.services),
            ", ".join(self.runtime.addresses),
            host,
            port,
            # "control at" is what waits for an agent's start: a supervisor says it last
            "control at" if self.worker is None else "worker control socket",
            self.control_path,
        )
        try:
            await self._stop.wait()
            await self._shutdown(peer_server)
            await self._end_tasks()
        finally:
            peer_server.close()
            control_server.close()
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()
            self.imports.close()
            self.ledger.close()
            if self.node.overrides is not None:
                await self.node.overrides.close()

    def _open_store(self) -> OverrideKeeper:
        """The shared store, if the cluster file names one: with this node's certificate.
        gRPC opens its sockets from its own threads: the agent runs in its namespace."""
        spec = self.config.store
        if spec is None:
            return OverrideKeeper(None, self.name)
        from pysteer.store.etcd import Store  # noqa: PLC0415 - gRPC only with a store

        try:
            store = Store(
                spec.endpoints,
                self.config.name,
                ca=self.config.ca.read_bytes(),
                cert=self.me.cert.read_bytes(),
                key=self.me.key.read_bytes(),
                timeout=spec.timeout,
            )
        except (OSError, ValueError) as exc:
            raise AgentError(f"the shared store: {exc}") from None
        log.info("shared store: etcd at %s", ", ".join(f"{h}:{p}" for h, p in spec.endpoints))
        return OverrideKeeper(store, self.name)

    async def _admission_from_store(self) -> None:
        """A node without its own record (a reinstalled or replaced host) takes the one in
        the shared store: it stays cordoned or drained as it was. A node with one keeps
        its own, and the store gets it."""
        keeper = self.node.overrides
        assert keeper is not None  # noqa: S101
        path = self.node.admission_file
        if path is not None and not path.exists():
            stored = await keeper.stored_admission()
            if stored is not None and stored != (self.accepting, self.drained_to):
                self.node.admit(accepting=stored[0], drained_to=stored[1])
                log.warning(
                    "%s has no state of its own: it is %s, as the shared store says",
                    self.name,
                    Admission(*stored).describe(),
                )
                return
        keeper.keep_admission(self.accepting, self.drained_to)

    async def _sweep(self) -> None:
        """Soon after the start, then every SWEEP_INTERVAL: the overrides that name this
        node for flows it no longer serves go (a restart ended every connection here).
        Not with workers: one worker serves only its share of the node's flows."""
        keeper = self.node.overrides
        assert keeper is not None  # noqa: S101
        delay = SWEEP_FIRST
        while True:
            await asyncio.sleep(delay)
            delay = SWEEP_INTERVAL
            try:
                removed = await keeper.sweep(lambda: set(self.served_flows()))
            except StoreError as exc:
                log.warning("store: the sweep of stale overrides failed (%s); later again", exc)
                delay = SWEEP_FIRST * 6
                continue
            if removed:
                log.info("store: %d stale override(s) to this node removed", removed)

    async def _end_tasks(self, timeout: float = 5.0) -> None:
        """Cancel the background tasks and wait until they are gone. A cancel can be lost:
        Python 3.11's ``wait_for`` returns the result instead of raising when its inner
        future completes in the same turn as the cancel, and a loop around it then runs
        on, so ``asyncio.run`` would wait for it forever (an agent once took longer than
        15 s to stop). So cancel again until every task is done, within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and loop.time() < deadline:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.wait(list(self._tasks), timeout=0.1)
        for task in self._tasks:
            log.error("stopping: task %s did not end", task.get_name())

    def _on_stop_signal(self, name: str) -> None:
        if self._stop_signal is None:
            log.info("%s: stopping", name)
        self._stop_signal = name
        self._stop.set()

    async def _shutdown(self, peer_server: asyncio.AbstractServer) -> None:
        """Drain to ``drain_to`` if the cluster file names one, then end what is left."""
        moved = 0
        target = self.me.drain_to
        if target and self.runtime.connections:
            moved = await self._drain_before_stop(target)
        peer_server.close()
        await self._finish_migrations()
        for mid, (_migration, task) in list(self.in_doubt.items()):
            task.cancel()
            log.error(
                "stopping with migration %s in-doubt: its frozen socket closes "
                "silently, and the connection is lost unless the target has it",
                mid[:12],
            )
        self.imports.close()
        ended = await self.runtime.close()
        log.info(
            "agent %s stopped: %d connection(s) moved%s, %d ended (close_notify + FIN)",
            self.name,
            moved,
            f" to {target}" if target else "",
            ended,
        )

    async def _drain_before_stop(self, target: str) -> int:
        timeout = self.me.drain_timeout
        stop = asyncio.Event()

        async def quiet(_counts: dict[str, Any]) -> None:
            return None

        drain = Drain(self.node, self.migrate_flow, target, 32, 5.0, stop=stop, progress=quiet)
        try:
            await drain.start()
        except DrainError as exc:
            log.error("stopping: cannot drain to %s (%s); ending the connections", target, exc)
            return 0
        log.info(
            "stopping: draining %d connection(s) to %s (at most %g s)",
            len(self.runtime.connections),
            target,
            timeout,
        )
        task = self._spawn(drain.run())
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            stop.set()  # the batch in flight finishes: no migration is cut in half
        summary = await task
        return int(summary["moved"])

    async def _finish_migrations(self) -> None:
        running = [t for t in self._tasks if not t.done() and t.get_name().startswith("mig:")]
        if running:
            await asyncio.wait(running, timeout=30)

    # --- peers (mTLS) ----------------------------------------------------------------------
    async def _peer_tls(self, transport: asyncio.Transport) -> None:
        """The TLS handshake of a peer connection, logged when it fails."""
        loop = asyncio.get_running_loop()
        addr = transport.get_extra_info("peername")
        reader = asyncio.StreamReader(limit=aio.STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            tls = await loop.start_tls(
                transport, protocol, self.server_tls, server_side=True, ssl_handshake_timeout=10
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            if getattr(exc, "verify_message", None):  # why the certificate was refused
                reason = f"{reason}: {exc.verify_message}"
            log.warning("refused a peer connection from %s: %s", addr and addr[0], reason)
            transport.close()
            return
        protocol.connection_made(tls)
        await self._peer(reader, asyncio.StreamWriter(tls, protocol, reader, loop))

    async def _peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        try:
            who = peer_node(writer.get_extra_info("ssl_object"), self.config.nodes)
        except IdentityError as exc:
            log.warning("refused a peer connection from %s: %s", addr[0], exc)
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def answer(request: dict[str, Any]) -> dict[str, Any]:
            try:
                return await self._peer_op(who, request)
            except Exception as exc:  # never a dead link for one bad request
                log.exception("peer request from %s failed", who)
                return {"ok": False, "error": f"internal error ({type(exc).__name__})"}

        try:
            await aio.serve(aio.Connection(reader, writer), answer, f"this agent ({self.name})")
        except ProtocolError as exc:  # a version refused, garbage, or a stall
            log.warning("peer link from %s dropped: %s", who, exc)
        except OSError:
            pass
        finally:
            writer.close()

    async def _peer_op(  # noqa: PLR0911
        self, who: str, req: dict[str, Any], *, batched: bool = False
    ) -> dict[str, Any]:
        """One request from peer ``who``; ``batched``: it came in a batch (a drain)."""
        op = req.get("op")
        if not isinstance(op, str):
            return {"ok": False, "error": "op must be a string"}
        if op == "control":  # the CLI from another machine, with a cluster certificate
            return await self._remote_control(who, req.get("request"))
        if op == "hello":
            return {
                "ok": True,
                "node": self.name,
                "accepting": self.accepting,
                "services": sorted(self.runtime.services),
                "apps": self.runtime.signatures(),
                "workers": self.me.workers,
            }
        if op == "batch":
            return await self._peer_batch(who, req.get("requests"))
        mid = req.get("id")
        if op not in ("move", "outcome"):
            return {"ok": False, "error": f"unknown op {op[:40]!r}"}
        if not isinstance(mid, bytes) or len(mid) != 16:
            return {"ok": False, "error": f"{op[:40]!r} needs a 16-byte migration id"}
        if (owner := worker_of(mid, self.me.workers)) != (self.worker or 0):
            # Nothing was opened or recorded: for a move, that is a safe "aborted".
            error = (
                f"migration {mid.hex()[:12]} belongs to worker {owner} of {self.name}, not to "
                f"worker {self.worker or 0}: do both nodes' cluster files give {self.name} "
                f"workers = {self.me.workers}?"
            )
            return {"ok": False, "error": error} | ({"code": "aborted"} if op == "move" else {})
        if op == "move":
            version = req.get("version")
            if version is not None and (
                isinstance(version, bool) or not isinstance(version, int) or version < 0
            ):
                return {"ok": False, "error": "move: version must be an integer >= 0"}
            return await self.imports.move(
                who, mid, req.get("blob"), batched=batched, version=version
            )
        return self.imports.outcome(mid)

    async def _peer_batch(self, who: str, requests: Any) -> dict[str, Any]:
        """A drain's moves to this node, many in one message: run side by side (their
        claims then leave as one request too), answered in order."""
        if not isinstance(requests, list) or not 0 < len(requests) <= MAX_BATCH:
            return {"ok": False, "error": f"batch: requests must be a list of 1..{MAX_BATCH}"}

        async def one(req: Any) -> dict[str, Any]:
            if not isinstance(req, dict) or req.get("op") not in ("move", "outcome"):
                return {"ok": False, "error": "a batch holds only move and outcome"}
            try:
                return await self._peer_op(who, req, batched=True)
            except Exception as exc:  # one bad move must not fail the others
                log.exception("peer request from %s failed", who)
                return {"ok": False, "error": f"internal error ({type(exc).__name__})"}

        return {"ok": True, "answers": list(await asyncio.gather(*map(one, requests)))}

    async def _remote_control(self, who: str, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or request.get("cmd") not in REMOTE_COMMANDS:
            return {"ok": False, "error": f"remote commands: {', '.join(REMOTE_COMMANDS)}"}
        log.info("remote %s from %s", request["cmd"], who)
        if self.worker is not None:  # the node's answer, from all its workers
            return await self._ask_supervisor(request)
        return await self._control_op(request)

    async def _ask_supervisor(self, request: dict[str, Any]) -> dict[str, Any]:
        path = control_path(self.config.name, self.name)
        try:
            conn = await aio.open_unix(path, f"agent {self.name}")
        except OSError as exc:
            return {"ok": False, "error": f"{self.name}'s supervisor is unreachable: {exc}"}
        try:
            return await asyncio.wait_for(conn.exchange(request), 60.0)
        except OSError as exc:  # TimeoutError and the RPC's ProtocolError among them
            return {"ok": False, "error": f"{self.name}'s supervisor: {exc}"}
        finally:
            conn.close()

    def _count_import(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.imported(outcome)

    # --- keeping the steering node true ------------------------------------------------------
    def _on_closed(self, conn: Connection) -> None:
        """Every steering node drops its entry at once (the programs also see most closes;
        this covers the rest), and the shared store its override."""
        if conn.flow is not None:
            self._closed.add(str(conn.flow))
            if self.node.overrides is not None:
                self.node.overrides.closed(str(conn.flow))

    def _on_opened(self, conn: Connection) -> None:
        """With several steering nodes, each steers a connection accepted here to this
        node: a drain's diversion entered it only at the one its SYN reached."""
        if conn.flow is not None and len(self.steering.members) > 1:
            self._opened.add(str(conn.flow))

    def served_flows(self) -> list[str]:
        """Every flow this node serves. Not its imports in progress: a sync steers what it
        lists to this node, and an import is this node's only once its claim succeeds (a
        sync that listed a claiming import once steered a flow here after the steering node
        had given it back to its source)."""
        return [str(c.flow) for c in self.runtime.connections.values() if c.flow]

    async def _served(self) -> list[str]:
        return self.served_flows()

    # --- local control (unix socket, 0600) ---------------------------------------------------
    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = aio.Connection(reader, writer, max_frame=MAX_CONTROL_REQUEST)

        async def answer(req: dict[str, Any]) -> dict[str, Any] | None:
            if req.get("cmd") == "drain":
                await self._drain(req, conn)  # it answers as it goes
                return None
            return await self._control_op(req)

        await aio.serve_local(conn, answer, f"this agent ({self.name})", log)

    async def _control_op(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._dispatch(req)
        except Exception as exc:  # a bug must answer, not kill the control connection
            log.exception("control request %.40r failed", req.get("cmd"))
            return {"ok": False, "error": f"internal error ({type(exc).__name__}); see the log"}

    async def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911 - dispatch
        cmd = req.get("cmd")
        if not isinstance(cmd, str):
            return {"ok": False, "error": "cmd must be a string"}
        if cmd == "flows":
            flows = [c.describe() | {"node": self.name} for c in self.runtime.connections.values()]
            return {"ok": True, "flows": flows}
        if cmd == "status":
            return {"ok": True, "status": await self.status()}
        if cmd == "served":  # what a supervisor syncs for its workers
            return {"ok": True, "flows": self.served_flows()}
        if cmd == "migrations":
            return {"ok": True, "migrations": self.migrations(), "recent": list(self.history)[-50:]}
        if cmd == "resolve":
            return self._resolve(req)
        if cmd == "undrain":
            return await self._undrain()
        if cmd in ("cordon", "uncordon"):
            self.node.admit(accepting=cmd == "uncordon", drained_to=self.drained_to)
            return {"ok": True, "accepting": self.accepting}
        if cmd == "migrate":
            return await self._migrate(req)
        return {"ok": False, "error": f"unknown command {cmd[:40]!r}"}

    def migrations(self) -> list[dict[str, Any]]:
        """In-flight and in-doubt migrations of this node, as source or as target."""
        out = [m.describe() for m in self.inflight.values()]
        out += [m.describe() | {"state": "in-doubt"} for m, _ in self.in_doubt.values()]
        out += self.imports.describe()
        return out

    def _resolve(self, req: dict[str, Any]) -> dict[str, Any]:
        """The operator decides an in-doubt migration: keep the flow on its ``source`` or
        its ``target``. Each node applies the decision to its own side."""
        mid, keep = req.get("id"), req.get("keep")
        if keep not in ("source", "target"):
            return {"ok": False, "error": "keep must be 'source' or 'target'"}
        if not isinstance(mid, str) or not mid:
            return {"ok": False, "error": "id must be a migration id (hex)"}
        for key, (migration, task) in list(self.in_doubt.items()):
            if key.startswith(mid):
                task.cancel()
                del self.in_doubt[key]
                report = migration.force(keep).to_json()
                self.history.append(report)
                return {"ok": True, "resolved": report["id"], "outcome": report["outcome"]}
        forced = self.imports.force(mid, keep)
        if forced is not None:
            return forced
        return {
            "ok": False,
            "error": f"no in-doubt migration {mid[:40]!r} on {self.name}",
            "code": "absent",
        }

    async def _migrate(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911 - checks
        try:
            flow = Flow.parse(str(req.get("flow", "")))
        except FlowSyntaxError as exc:
            return {"ok": False, "error": str(exc)}
        target = req.get("to")
        timeout = req.get("timeout_s", 5.0)
        if not isinstance(target, str):
            return {"ok": False, "error": "to must be a node name"}
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not MIN_TIMEOUT <= timeout <= 600
        ):
            return {"ok": False, "error": f"timeout must be in [{MIN_TIMEOUT:g}, 600] seconds"}
        if target == self.name:
            return {"ok": False, "error": f"flow {flow} is already on {target}"}
        if target not in self.peers:
            known = ", ".join(sorted(self.config.nodes))
            return {"ok": False, "error": f"unknown node {target[:40]!r} (nodes: {known})"}
        if self.runtime.find(flow) is None:
            error = f"flow {flow} is not served on {self.name}"
            return {"ok": False, "error": error, "code": "absent"}
        if flow in self._moving:
            return {"ok": False, "error": f"flow {flow} is already moving"}
        return {"ok": True, "migration": await self.migrate_flow(flow, target, float(timeout))}

    async def migrate_flow(
        self,
        flow: Flow,
        target: str,
        timeout: float,
        *,
        hello: dict[str, Any] | None = None,
        batch: bool = False,
    ) -> dict[str, Any]:
        """Move one flow (checked by the caller); returns the report, kept in the history.
        ``hello``: the target's answer to a hello just asked (a drain), not asked again;
        ``batch``: its requests may leave with other migrations' (a drain)."""
        migration = Migration(self.node, flow, target, timeout, hello=hello, batch=batch)
        return await self.run_migration(migration)

    async def run_migration(self, migration: Migration) -> dict[str, Any]:
        """Run it as its own task: a caller that goes away (a CLI, a drain cut short) must
        never cancel a migration halfway."""
        self._moving.add(migration.flow)
        self.inflight[migration.report.id] = migration
        task = self._spawn(migration.run())
        task.set_name(f"mig:{migration.report.id[:12]}")
        try:
            report = await asyncio.shield(task)
        finally:
            self._moving.discard(migration.flow)
            self.inflight.pop(migration.report.id, None)
        if report.outcome == "in-doubt":
            self.hold_in_doubt(migration, report.error or "unknown")
        result = report.to_json()
        self.history.append(result)
        if self.metrics is not None:
            self.metrics.migration(result)
        return result

    def hold_in_doubt(self, migration: Migration, why: str) -> None:
        """A migration whose outcome is unknown: its socket stays frozen, and a task asks
        until it knows (``pysteer migrations resolve`` can decide for it)."""
        key = migration.report.id
        log.error(
            "migration %s of %s is in-doubt (%s); asking again until it is known",
            key[:12],
            migration.flow,
            why,
        )

        async def settle() -> None:
            report = await migration.settle()
            self.in_doubt.pop(key, None)
            self.history.append(report.to_json())
            log.warning(
                "in-doubt migration %s of %s resolved: %s", key[:12], migration.flow, report.outcome
            )

        self.in_doubt[key] = (migration, self._spawn(settle()))

    async def _drain(self, req: dict[str, Any], conn: aio.Connection) -> None:
        """A drain streams progress answers, then its summary; any frame from the client
        (or its hanging up) stops it after the batch in flight."""

        async def send(message: dict[str, Any]) -> None:
            try:
                await conn.answer(message)
            except (ConnectionError, OSError):
                stop.set()

        target, batch, timeout = req.get("to"), req.get("batch", 32), req.get("timeout_s", 5.0)
        error = None
        if not isinstance(target, str) or target not in self.peers:
            shown = target[:40] if isinstance(target, str) else target
            error = f"cannot drain {self.name} to {shown!r}" + (
                " (itself)" if target == self.name else f" (nodes: {', '.join(self.peers)})"
            )
        elif isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096:
            error = "batch must be 1..4096"
        elif (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not MIN_TIMEOUT <= timeout <= 600
        ):
            error = f"timeout must be in [{MIN_TIMEOUT:g}, 600] seconds"
        stop = asyncio.Event()
        if error:
            await send({"ok": False, "error": error})
            return
        drain = Drain(
            self.node,
            self.migrate_flow,
            str(target),
            batch,
            float(timeout),
            stop=stop,
            progress=lambda counts: send({"ok": True, "progress": counts}),
        )
        try:
            await drain.start()
        except DrainError as exc:
            await send({"ok": False, "error": str(exc)})
            return

        async def watch() -> None:
            with contextlib.suppress(OSError):  # the RPC's ProtocolError among them
                await conn.receive()
            stop.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            summary = await drain.run()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher  # gone before the control loop reads again
        log.info(
            "drain %s -> %s%s: %d moved, %d rolled back, %d failed, %d still here",
            self.name,
            target,
            " (interrupted)" if summary["interrupted"] else "",
            summary["moved"],
            summary["rolled_back"],
            summary["failed"],
            len(summary["remaining"]),
        )
        await send({"ok": True, "drain": summary})

    async def _undrain(self) -> dict[str, Any]:
        keeper = self.node.overrides
        try:
            for vip in self.runtime.addresses:
                if keeper is not None:
                    await keeper.divert(vip, None)
        except StoreRefused as exc:
            return {"ok": False, "error": f"{exc}; still drained"}
        try:
            for vip in self.runtime.addresses:
                await self.steer.call(5.0, cmd="divert", address=vip, host=None)
        except (LinkError, Refused) as exc:
            return {"ok": False, "error": f"steering node: {exc}"}
        self.node.admit(accepting=True, drained_to=None)
        return {"ok": True}

    async def status(self) -> dict[str, Any]:
        async def one(pool: LinkPool) -> dict[str, Any]:
            try:
                stats = await pool.call(2.0, cmd="stats")
            except (LinkError, Refused) as exc:
                return {"reachable": False, "error": str(exc)}
            return {"reachable": True, "stats": stats.get("stats")}

        members = self.steering.members
        found = await asyncio.gather(*(one(m.pool) for m in members.values()))
        steers = dict(zip(members, found, strict=True))
        down = [s for s in steers.values() if not s["reachable"]]
        steer = down[0] if down else next(iter(steers.values()))  # every one, for short
        return {
            "steer": steer,
            "steers": steers,
            "node": self.name,
            "version": __version__,
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
            "prepared": 0,  # a move is restored, thawed and claimed in one step now
            "claiming": sum(1 for i in self.imports.describe() if i["state"] == "claiming"),
            "inflight": len(self.inflight),
            "in_doubt": sorted(self.in_doubt),
            "migrations": {
                o: sum(1 for m in self.history if m["outcome"] == o)
                for o in {m["outcome"] for m in self.history}
            },
        }


def run(
    config: ClusterConfig,
    node: str,
    *,
    metrics: tuple[str, int] | None = None,
    log_json: bool = False,
    sync_interval: float = 30.0,
    worker: int | None = None,
) -> int:
    """``pysteer agent run``: serve until SIGTERM (``worker``: as that worker of the node)."""
    setup_logging(log_json, worker)
    agent = Agent(config, node, metrics=metrics, sync_interval=sync_interval, worker=worker)
    # The collector's full passes over every live object (thousands of connections) were
    # pauses in a drain's freezes: what start-up made stays out of them, and passes come
    # less often (measured: a drain's freeze p99 19 ms, 23-28 ms without).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    asyncio.run(agent.serve())
    return 0
