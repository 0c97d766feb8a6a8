"""``pysteer steer run``: the steering daemon, serving its control API on a unix socket
(root's) and, with ``--listen``, to the agents over mutual TLS.

The flow table, hosts and counters are pinned maps, so a killed daemon leaves steering
running in the kernel and a restarted one takes over the same flows. Only one daemon may
own an instance (a lock next to its socket).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pysteer.bpfload import BpfBuildError
from pysteer.flow import Flow, FlowSyntaxError
from pysteer.identity import IdentityError, peer_node
from pysteer.metrics import setup_logging
from pysteer.netns import call_in
from pysteer.paths import RUN_DIR
from pysteer.rpc import blocking
from pysteer.rpc.codec import encode
from pysteer.rpc.errors import Busy, ProtocolError, VersionMismatch, answer_for
from pysteer.steer.control import MAX_REQUEST, RequestError, socket_path
from pysteer.steer.loader import AttachError
from pysteer.steer.maps import Action
from pysteer.steer.mirror import DIVERT, SET, UNSET, Op
from pysteer.steer.pins import PinError
from pysteer.steer.steerer import HostSpec, Refusal, Steerer, SteerError, resolve
from pysteer.steer.store_feed import Feed, Preload

log = logging.getLogger("pysteer.steer")


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why."""


# Control connections are served by one thread each, so their number is bounded, and a
# connection beyond a bound is refused at once (never queued). The unix socket and the TLS
# listener have a budget each: a flood of one leaves the other usable. On the TLS listener,
# a connection that has not yet proved who it is (its handshake) holds a handshake slot,
# at most 20 per source address (an agent opens up to 16 links at once when a drain
# starts): anyone who can reach the port can use those, so they are short, and one
# address cannot hold them all. Only after the handshake and the identity
# check does a connection hold a session slot, counted per host: one host cannot use up
# another's.
MAX_LOCAL_CLIENTS = 64  # the unix socket: operators' commands, one connection per command
MAX_HANDSHAKES = 64  # TLS handshakes in progress, all sources together
MAX_HANDSHAKES_PER_SOURCE = 20  # ... from one address
HANDSHAKE_TIMEOUT = 5.0  # seconds a whole handshake may take
MAX_SESSIONS_PER_HOST = 24  # an agent keeps up to 16 links; a few more ride out reconnects
LOCAL_IDLE_TIMEOUT = 30.0  # a unix client's next request, whole, must arrive within this
REQUEST_TIMEOUT = 30.0  # a request that has started to arrive must be complete within this
REFUSALS_LOG_EVERY = 10.0  # seconds between two log lines about refused connections
KEEPALIVE = (60, 10, 6)  # TCP idle, interval, probes: a vanished agent's slot frees in ~2 min


class _LogLimit:
    """At most ``burst`` log lines about refusals per REFUSALS_LOG_EVERY seconds: each
    refusal is worth a line until a flood would fill the log."""

    def __init__(self, burst: int) -> None:
        self.burst, self._lock = burst, threading.Lock()
        self._window, self._lines, self._unlogged = -REFUSALS_LOG_EVERY, 0, 0

    def admit(self) -> int:
        """Count one refusal: 0 if it gets no line, else how many refusals the line is for
        (this one, and those that got none since the last line)."""
        with self._lock:
            now = time.monotonic()
            if now - self._window >= REFUSALS_LOG_EVERY:
                self._window, self._lines = now, 0
            self._unlogged += 1
            if self._lines >= self.burst:
                return 0
            self._lines += 1
            count, self._unlogged = self._unlogged, 0
            return count


class _Burst:
    """Refusals worth a line each (with their reason), 20 per REFUSALS_LOG_EVERY at most;
    the next line then says how many went unlogged."""

    def __init__(self, burst: int = 20) -> None:
        self._limit = _LogLimit(burst)

    def log(self, message: str, *args: object) -> None:
        count = self._limit.admit()
        if count > 1:
            log.warning("%d more control connection(s) were refused without a log line", count - 1)
        if count:
            log.warning(message, *args)


class _Slots:
    """The connections served at once: at most ``limit`` in all (None: no total bound) and
    ``per_key`` for any one key (a source address, a host). The rest are refused, counted,
    and logged at most every REFUSALS_LOG_EVERY seconds (a flood is one line)."""

    def __init__(self, where: str, limit: int | None, per_key: int | None = None) -> None:
        self.where, self.limit, self.per_key = where, limit, per_key
        self.open = self.refused = 0
        self._by_key: dict[str, int] = {}
        self._log = _LogLimit(1)  # a flood is one line
        self._lock = threading.Lock()

    def take(self, key: str = "") -> bool:
        with self._lock:
            mine = self._by_key.get(key, 0)
            if (self.limit is None or self.open < self.limit) and (
                self.per_key is None or mine < self.per_key
            ):
                self.open += 1
                self._by_key[key] = mine + 1
                return True
            self.refused += 1
        count = self._log.admit()
        if count:
            log.warning(
                "refused %d control connection(s) on %s: at most %s at once%s",
                count,
                self.where,
                self.limit or "unbounded",
                f", {self.per_key} per peer" if self.per_key else "",
            )
        return False

    def give(self, key: str = "") -> None:
        with self._lock:
            self.open -= 1
            left = self._by_key.get(key, 1) - 1
            if left:
                self._by_key[key] = left
            else:
                self._by_key.pop(key, None)

    def busy(self) -> str:
        return (
            f"steering daemon busy: {self.limit} control connections are open on "
            f"{self.where}, the most it serves at once; try again shortly"
        )


_ACTIONS = (Action.PASS, Action.PARK, Action.TO)


def _flow_row(flow: Flow, value: Any, hosts: dict[int, str], park: Any) -> dict[str, Any]:
    action = Action(value.action)
    now = time.monotonic_ns()
    return {
        "parked": park.parked,
        "replayed": park.replayed,
        "park_dropped": park.dropped,
        "park_lost": park.lost,
        "flow": str(flow),
        "action": action.name,
        "host": hosts.get(value.host) if action == Action.TO else None,
        "packets": {a.name.lower(): value.packets[a] for a in _ACTIONS},
        "bytes": {a.name.lower(): value.bytes[a] for a in _ACTIONS},
        "park_seq": value.park_seq,
        "migration": f"{value.token:016x}" if value.token else None,
        "lease_s": round((value.lease_ns - now) / 1e9, 3) if value.lease_ns else None,
        "idle_s": round((now - value.last_ns) / 1e9, 3) if value.last_ns else None,
        "fin": {"client": value.fins[0], "service": value.fins[1]},
    }


LOGGED = ("park", "to", "pass", "forget")  # changes logged at info (divert too)


def _asker(who: str | None) -> str:
    """Who sent a request: an agent over mutual TLS, or the root-only local socket."""
    return f"agent {who}" if who is not None else "the local control socket"


def _text(req: dict[str, Any], key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{key} must be a non-empty string")
    if len(value) > 200:
        raise RequestError(f"{key} is {len(value)} characters long: at most 200")
    return value


def _token(req: dict[str, Any], *, optional: bool = False) -> int:
    """A migration's token: a 64-bit integer (0 only where the request may have none)."""
    value = req.get("token", 0 if optional else None)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise RequestError("token must be an integer in [0, 2**64)")
    if not value and not optional:
        raise RequestError("token must not be 0")
    return value


def _apply_op(steerer: Steerer, op: Op) -> str:
    if op.what == SET:
        return steerer.override(op.flow, op.host)
    if op.what == UNSET:
        return steerer.unoverride(op.flow, op.host)
    return steerer.store_divert(op.flow, op.host if op.what == DIVERT else None, op.host)


class Daemon:
    def __init__(self, steerer: Steerer, path: Path, feed: Feed | None = None) -> None:
        self.steerer, self.path, self.feed = steerer, path, feed
        self._stop = threading.Event()
        self._tls_server: socket.socket | None = None
        self.tls_context: ssl.SSLContext | None = None  # of the mutual-TLS listener
        self._server: socket.socket | None = None
        self._syncs: dict[str, tuple[int, set[Flow]]] = {}  # host -> (next part, flows so far)
        self._sync_lock = threading.Lock()
        self._local = _Slots(f"the control socket {path}", MAX_LOCAL_CLIENTS)
        self._handshakes = _Slots(
            "the TLS listener (handshakes)", MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE
        )
        self._sessions = _Slots("the TLS listener (agents)", None, MAX_SESSIONS_PER_HOST)
        self._refusals = _Burst()

    def handle(  # noqa: PLR0911 - dispatch
        self, req: dict[str, Any], who: str | None = None
    ) -> dict[str, Any]:
        """Answer one request. ``who``: the host whose agent sent it over mutual TLS (None
        on the root-only unix socket, where every command is allowed)."""
        cmd = req.get("cmd")
        try:
            if who is not None:
                _authorize(req, who)
            if cmd == "batch":
                return self._batch(req, who)
            if cmd in ("flows", "hosts", "stats"):
                return {"ok": True, cmd: self._show(cmd)}
            if cmd in ("park", "to", "pass", "forget", "claim", "revert", "decision"):
                return {"ok": True} | self._change(cmd, req, who)
            if cmd == "divert":
                return self._divert(req, who)
            if cmd == "diversions":
                return {"ok": True, "diversions": self.steerer.diversions()}
            if cmd == "hello":
                return {
                    "ok": True,
                    "boot": self.steerer.boot,
                    "name": self.steerer.name,
                    "usage": self.steerer.table_usage(),
                }
            if cmd == "store":
                return {"ok": True, "store": self.feed.report() if self.feed else None}
            if cmd in ("sync", "closed", "opened"):
                return {"ok": True, "boot": self.steerer.boot} | self._report(cmd, req)
            if cmd == "gc":
                dry = req.get("dry_run", False) is True
                found = self.steerer.gc(dry_run=dry)
                return {"ok": True, "dry_run": dry, "removed": [r.to_json() for r in found]}
            return {"ok": False, "error": f"unknown command {str(cmd)[:40]!r}"}
        except Refusal as exc:
            return {"ok": False, "error": str(exc), "code": exc.code}
        except (SteerError, FlowSyntaxError, RequestError) as exc:
            return {"ok": False, "error": str(exc)}

    def _batch(self, req: dict[str, Any], who: str | None) -> dict[str, Any]:
        """Many migrations' requests in one round trip (a drain's park, claim, revert or
        decision for each of its flows): each answered as if it came alone, in order."""
        requests = req.get("requests")
        if not isinstance(requests, list) or not 0 < len(requests) <= MAX_BATCH:
            raise RequestError(f"batch: requests must be a list of 1..{MAX_BATCH} requests")
        answers = []
        for sub in requests:
            if not isinstance(sub, dict) or sub.get("cmd") not in BATCHED:
                answers.append({"ok": False, "error": f"a batch holds only {', '.join(BATCHED)}"})
            else:
                answers.append(self.handle(sub, who))
        return {"ok": True, "answers": answers}

    def _show(self, what: str) -> Any:
        st = self.steerer
        if what == "flows":
            hosts = st.items_by_host()
            return [_flow_row(f, v, hosts, st.park_counters(f)) for f, v in st.items()]
        if what == "hosts":
            return [
                {"name": h.name, "ifname": h.ifname, "mac": h.mac.hex(":"), "id": h.id}
                for h in st.hosts.values()
            ]
        refused = self._local.refused + self._handshakes.refused + self._sessions.refused
        return st.stats() | st.table_usage() | {"control_refused": refused}

    def _divert(self, req: dict[str, Any], who: str | None) -> dict[str, Any]:
        try:
            address = ipaddress.ip_address(str(req.get("address")))
        except ValueError:
            return {
                "ok": False,
                "error": f"divert: not an address: {str(req.get('address'))[:60]!r}",
            }
        host = req.get("host")
        self.steerer.divert(address, None if host is None else str(host))
        where = f"to {host}" if host is not None else "back to its route"
        log.info("divert new connections to %s %s, asked by %s", address, where, _asker(who))
        return {"ok": True, "diversions": self.steerer.diversions()}

    def _change(self, cmd: str, req: dict[str, Any], who: str | None) -> dict[str, Any]:
        answer = self._apply(cmd, req)
        if cmd in LOGGED:  # what an operator asks for, or a migration's park: the audit
            flow, host, owner = req.get("flow"), req.get("host"), req.get("owner")
            log.info(
                "%s %s%s%s, asked by %s",
                cmd,
                flow,
                f" to {host}" if cmd == "to" or (cmd == "pass" and host) else "",
                f" for {str(owner)[:64]}" if cmd == "park" and owner else "",
                _asker(who),
            )
        return answer

    def _apply(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911
        st = self.steerer
        flow = Flow.parse(_text(req, "flow"))
        if cmd == "park":
            lease = req.get("lease")
            if lease is not None and not (isinstance(lease, int | float) and 0 < lease <= 3600):
                raise RequestError("lease must be a number of seconds in (0, 3600]")
            owner = req.get("owner")
            action, host = st.park(
                flow,
                token=_token(req, optional=True),
                lease=lease,
                owner=str(owner)[:64] if owner else None,
            )
            return {"was": action.name if action is not None else None, "host": host}
        if cmd == "to":
            return {"replayed": st.to(flow, _text(req, "host"))}
        if cmd == "pass":
            if st.get(flow) is None:
                raise SteerError(f"flow {flow} is not in the table")
            host = req.get("host")
            return {"replayed": st.pass_(flow, replay_to=None if host is None else str(host))}
        if cmd == "claim":
            replayed, parked_ms = st.claim(flow, _text(req, "host"), _token(req))
            return {"replayed": replayed, "parked_ms": parked_ms}
        if cmd == "revert":
            host, hold = req.get("host"), req.get("hold", False)
            if not isinstance(hold, bool):
                raise RequestError("hold must be true or false")
            replay_to = str(host) if host is not None else None
            replayed, where = st.revert(flow, _token(req), hold=hold, replay_to=replay_to)
            return {"replayed": replayed, "host": where}
        if cmd == "decision":
            return st.decision(flow, _token(req))
        st.forget(flow)
        return {}

    def _report(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """An agent's report: the connections it closed, or (in parts) all it serves."""
        host = _text(req, "host")
        raw = req.get("flows")
        if not isinstance(raw, list) or not all(isinstance(f, str) for f in raw):
            raise RequestError(f"{cmd}: flows must be a list of FLOW strings")
        flows = [Flow.parse(f) for f in raw]
        if cmd == "closed":
            return {"removed": self.steerer.closed(host, flows)}
        if cmd == "opened":
            return {"steered": self.steerer.opened(host, flows)}
        interval = req.get("interval", 30)
        if not isinstance(interval, int | float) or not 0 < interval <= 3600:
            raise RequestError("sync: interval must be a number of seconds in (0, 3600]")
        part, done = req.get("part", 0), req.get("done", True)
        if not isinstance(part, int) or not isinstance(done, bool):
            raise RequestError("sync: part must be an integer and done a boolean")
        age = req.get("age", 0.0)  # seconds since the agent listed its flows
        if isinstance(age, bool) or not isinstance(age, int | float) or not 0 <= age <= 3600:
            raise RequestError("sync: age must be a number of seconds in [0, 3600]")
        with self._sync_lock:
            pending = self._syncs.get(host)
            if part == 0 or pending is None or pending[0] != part:
                pending = (0, set())
            served = pending[1] | set(flows)
            if not done:  # a large host sends its flows in parts; the last one decides
                self._syncs[host] = (part + 1, served)
                return {"part": part}
            self._syncs.pop(host, None)
        return self.steerer.sync(host, served, float(interval), time.monotonic() - age)

    def _client(
        self, conn: socket.socket, idle: float | None = None, who: str | None = None
    ) -> None:
        """Answer requests (pysteer's RPC, its hello first) until the client hangs up
        (agents keep it open). ``who``: the host a TLS client proved to be (see
        ``handle``).

        Every request gets an answer: a bad one its error, and an unexpected failure is
        logged and answered too, so no request can end this thread while its client still
        talks. A client that takes longer than ``idle`` (None: no limit) to send a request
        whole, or REQUEST_TIMEOUT to finish one it started, is hung up on: it holds a slot.
        """

        def answer(req: dict[str, Any]) -> dict[str, Any]:
            try:
                return self.handle(req, who)
            except Exception as exc:
                log.exception("control request failed")
                error = f"internal error ({type(exc).__name__}), see the daemon's log"
                return {"ok": False, "error": error}

        with conn:  # logged before the hang-up, so whoever sees the hang-up finds the line
            why = blocking.serve(
                conn,
                answer,
                "this steering daemon",
                idle=idle,
                max_frame=MAX_REQUEST,
                frame_timeout=REQUEST_TIMEOUT,
            )
            if isinstance(why, VersionMismatch):  # an operator must upgrade one side
                log.warning("refused a control client: %s", why)
            elif isinstance(why, ProtocolError | TimeoutError):
                log.info("hung up on a control client: %s", why)
            elif why is not None:  # a TLS client breaking its protocol, for one
                log.warning("control connection lost: %s", why)

    def bind(self) -> None:
        """Create the control socket (mode 0600) now, so it exists once "control at" is
        logged: clients wait for that line."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            server.bind(str(self.path))
        except OSError:
            server.close()
            raise
        finally:
            os.umask(old)
        server.listen()
        server.settimeout(0.2)
        self._server = server

    def serve(self) -> None:
        if self._server is None:
            self.bind()
        assert self._server is not None  # noqa: S101
        with self._server as server:
            while not self._stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                if not self._local.take():
                    _refuse(conn, self._local.busy())
                    continue
                self._spawn(self._local_client, (conn,), self._local.give)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def listen_tls(
        self, address: tuple[str, int], context: ssl.SSLContext, namespace: str | None = None
    ) -> None:
        """Also serve remote agents on TCP (in ``namespace``), mutually authenticated."""
        try:
            server = (
                call_in(namespace, socket.create_server, address)
                if namespace
                else socket.create_server(address)
            )
        except OSError as exc:
            raise DaemonError(
                f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        server.settimeout(0.2)
        self._tls_server = server
        self.tls_context = context  # SIGHUP may swap it: each new connection takes the latest

        def accept_loop() -> None:
            while not self._stop.is_set():
                try:
                    raw, peer = server.accept()
                except TimeoutError:
                    continue
                source = str(peer[0])
                if not self._handshakes.take(source):
                    raw.close()  # no TLS yet to say why in: the agent sees the link refused
                    continue
                _keepalive(raw)
                self._spawn(
                    self._tls_client,
                    (raw, self.tls_context, source),
                    functools.partial(self._handshakes.give, source),
                )
            server.close()

        threading.Thread(target=accept_loop, daemon=True).start()

    def _local_client(self, conn: socket.socket) -> None:
        try:
            self._client(conn, LOCAL_IDLE_TIMEOUT)
        finally:
            self._local.give()

    def _tls_client(self, raw: socket.socket, context: ssl.SSLContext, source: str) -> None:
        """A TLS connection: its handshake and identity check hold a handshake slot (given
        back here, whatever happens), then its requests hold a session slot of its host."""
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)  # the whole handshake, not each read
            try:
                conn = context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                raw.close()  # no valid client certificate: nothing is answered
                self._refusals.log("refused a control connection from %s: %s", source, exc)
                return
            try:  # only the agents of the hosts this daemon steers to may use it
                who = peer_node(conn, set(self.steerer.hosts))
            except IdentityError as exc:
                self._refusals.log("refused a control connection from %s: %s", source, exc)
                conn.close()
                return
        finally:
            self._handshakes.give(source)
        if not self._sessions.take(who):
            conn.close()
            return
        try:
            log.debug("control connection from %s (%s)", who, source)
            conn.settimeout(None)  # agents keep their connection open between migrations
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._client(conn, who=who)
        finally:
            self._sessions.give(who)

    def _spawn(self, serve: Any, args: tuple[Any, ...], release: Any) -> None:
        """Run ``serve(*args)`` in a thread of its own; it gives its slot back when done.
        With no thread to be had, the connection (``args[0]``) is refused, ``release``
        gives the slot back, and the accept loop goes on."""
        try:
            threading.Thread(target=serve, args=args, daemon=True).start()
        except RuntimeError as exc:
            args[0].close()
            release()
            log.warning("refused a control connection: %s", exc)

    def stop(self, *_: object) -> None:
        self._stop.set()

    def collect(self, interval: float) -> None:
        """The collector: leases, idle entries, leftovers, every ``interval`` seconds."""
        while not self._stop.wait(interval):
            try:
                self.steerer.gc()
            except Exception:  # never let the collector die; say why
                log.exception("flow collector failed; retrying in %g s", interval)


def run(
    name: str,
    ifname: str,
    hosts: list[tuple[str, str, str]],
    *,
    namespace: str | None = None,
    mode: str = "auto",
    max_flows: int | None = None,
    max_parked: int = 8192,
    listen: tuple[str, int] | None = None,
    tls: ssl.SSLContext | None = None,
    metrics: tuple[str, int] | None = None,
    log_json: bool = False,
    idle_timeout: float = 300.0,
    gc_interval: float = 5.0,
    reload_tls: Callable[[], ssl.SSLContext] | None = None,
    certificates: dict[str, Path] | None = None,
    store: tuple[list[str], float] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. The programs stay attached and the maps pinned.
    SIGHUP makes a new TLS context with ``reload_tls`` (the certificate, key and CA read
    again) for the agents' connections from then on; the ones up stay up.

    Everything is checked before anything running is touched: a daemon that cannot start
    (a wrong host, interface, MAC, or flow table size) leaves the attached programs and
    the pinned maps as they were, so steering never stops because a start failed.
    """
    setup_logging(log_json)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(name)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    feed = None
    try:
        feed, preload = _load_store(store)  # before anything is attached
        return _serve(
            name,
            ifname,
            hosts,
            namespace=namespace,
            mode=mode,
            max_flows=max_flows,
            max_parked=max_parked,
            listen=listen,
            tls=tls,
            metrics=metrics,
            idle_timeout=idle_timeout,
            gc_interval=gc_interval,
            reload_tls=reload_tls,
            certificates=certificates,
            feed=feed,
            preload=preload,
        )
    finally:
        if feed is not None:
            feed.close()
        # Gone with us, while still ours: /run keeps no file per instance ever run. A
        # daemon starting meanwhile finds that its lock is on an unlinked file and
        # takes the new one (see _take_lock).
        with contextlib.suppress(FileNotFoundError):
            lock_path(name).unlink()
        lock.close()


def _reload(daemon: Daemon, reload_tls: Callable[[], ssl.SSLContext] | None, *_: Any) -> None:
    """SIGHUP: the TLS certificate, key and CA read again, for connections from now on (a
    certificate rotated, a CA bundle with the next CA). A bad file keeps the current."""
    if reload_tls is None or daemon.tls_context is None:
        log.info("SIGHUP: nothing to reload (no --listen)")
        return
    try:
        context = reload_tls()
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.error("reload refused, keeping the current certificate and CA: %s", exc)
        return
    daemon.tls_context = context
    log.info("reloaded the TLS certificate, key and CA: new agent connections use them")


def _refuse(conn: socket.socket, error: str) -> None:
    """Answer a connection beyond the bound (in place of its hello's answer), and hang up."""
    with conn:
        conn.setblocking(False)  # a fresh socket's buffer takes the frame; never wait
        with contextlib.suppress(OSError):
            conn.sendall(encode(answer_for(Busy(error))))


def _keepalive(sock: socket.socket) -> None:
    """Probe an idle TCP peer, so a vanished agent's connection (no FIN) ends in time."""
    idle, interval, count = KEEPALIVE
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


# What an agent may ask over the TLS listener, and the fields that must name the agent
# itself: a host acts only for itself. The operator's commands (to, pass, forget, gc) need
# the root-only unix socket on the steering node.
AGENT_COMMANDS = {
    "hello": (),
    "stats": (),
    "store": (),
    "hosts": (),
    "diversions": (),
    "decision": (),
    "park": ("owner",),
    "revert": ("host",),
    "claim": ("host",),
    "sync": ("host",),
    "closed": ("host",),
    "opened": ("host",),
    "divert": (),
    "batch": (),  # each request in it is authorized as if it came alone
}
BATCHED = ("park", "revert", "claim", "decision")  # what a batch may hold
MAX_BATCH = 256


def _authorize(req: dict[str, Any], who: str) -> None:
    cmd = req.get("cmd")
    if cmd not in AGENT_COMMANDS:
        raise RequestError(
            f"{str(cmd)[:40]!r} is not an agent's command: run it on the "
            "steering node (its control socket)"
        )
    for name in AGENT_COMMANDS[cmd]:
        if name in req and req[name] is not None and req[name] != who:
            raise RequestError(
                f"{cmd}: {name} must be the caller ({who}), the only host "
                "its certificate speaks for"
            )


def _take_lock(name: str) -> IO[str]:
    """This instance's lock, held for the daemon's lifetime; DaemonError if another
    daemon holds it. A lock won on a file its exiting holder has just unlinked is no
    lock: try again on the file now at the path."""
    path = lock_path(name)
    for _ in range(100):
        lock = open(path, "a+")  # noqa: SIM115 - held for our lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DaemonError(
                f"another steering daemon already runs instance {name!r} "
                f"(pin path /sys/fs/bpf/pysteer/{name})"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()
    raise DaemonError(f"cannot take the lock {path}: it keeps being replaced")


def lock_path(name: str) -> Path:
    """The daemon's lock; it holds the daemon's pid (``pysteer lab down`` reads it)."""
    return RUN_DIR / f"steer-{name}.lock"


def _load_store(store: tuple[list[str], float] | None) -> tuple[Feed | None, Preload]:
    """Start the store reader and wait for every override (nothing is attached before)."""
    if store is None:
        return None, ({}, {})
    argv, wait = store
    feed = Feed(argv)
    feed.start()
    if not feed.loaded.wait(wait):
        report = feed.report()
        feed.close()
        raise DaemonError(
            f"the shared store's overrides could not be read in {wait:g} s "
            f"({report['state']}: {report['why'] or 'no answer'}): not attaching, since a "
            "moved flow's packets would go to its default host; nothing running was changed"
        )
    return feed, feed.preload()


def _serve(
    name: str,
    ifname: str,
    hosts: list[tuple[str, str, str]],
    *,
    namespace: str | None,
    mode: str,
    max_flows: int | None,
    max_parked: int,
    listen: tuple[str, int] | None,
    tls: ssl.SSLContext | None,
    metrics: tuple[str, int] | None,
    idle_timeout: float,
    gc_interval: float,
    reload_tls: Callable[[], ssl.SSLContext] | None,
    certificates: dict[str, Path] | None,
    feed: Feed | None,
    preload: Preload,
) -> int:
    specs = []
    for host, where, given_mac in hosts:
        host_if, mac = where, given_mac
        if not given_mac:  # NAME=ADDRESS: find its link and MAC
            try:
                host_if, mac = resolve(where, namespace)
            except SteerError as exc:
                raise DaemonError(f"--host {host}: {exc}") from None
        specs.append(HostSpec(host, host_if, mac))
    try:
        steerer = Steerer(
            name,
            ifname,
            namespace=namespace,
            mode=mode,
            max_flows=max_flows,
            max_per_flow=max_parked,
            hosts=specs,
            idle_timeout=idle_timeout,
            preload=preload[0],
            diversions=preload[1],
        )
    except (SteerError, AttachError, PinError, BpfBuildError, OSError) as exc:
        raise DaemonError(f"{exc}; nothing running was changed") from None
    if feed is not None:
        feed.attach(functools.partial(_apply_op, steerer), preload)
    daemon = Daemon(steerer, socket_path(name), feed)
    try:
        daemon.bind()
        if listen is not None:
            if tls is None:
                raise DaemonError("a TCP control listener needs mutual TLS (certificate, key, CA)")
            daemon.listen_tls(listen, tls, namespace)
        if metrics is not None:
            _serve_metrics(steerer, metrics, namespace, certificates or {}, name, feed=feed)
    except OSError as exc:
        steerer.close()
        raise DaemonError(f"cannot serve control at {daemon.path}: {exc.strerror or exc}") from None
    except BaseException:
        steerer.close()
        raise
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    signal.signal(signal.SIGHUP, functools.partial(_reload, daemon, reload_tls))
    collector = threading.Thread(target=daemon.collect, args=(gc_interval,), daemon=True)
    collector.start()
    log.info(
        "steering %s (%s) as %r, %d/%d flows in the table, idle timeout %g s; control at %s",
        ifname,
        steerer.mode,
        name,
        len(steerer.table),
        steerer.max_flows,
        idle_timeout,
        daemon.path,
    )
    # As the agent does (pysteer.agent.agent.run): start-up's objects (BCC's among them)
    # stay out of the collector's passes, which come less often; a pass held the GIL
    # while claims waited (a drain's freeze max 15-17 ms with it, 23-27 ms without).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        daemon.serve()
    finally:
        steerer.close()
    return 0


def _serve_metrics(
    steerer: Steerer,
    metrics: tuple[str, int],
    namespace: str | None,
    certificates: dict[str, Path],
    name: str,
    *,
    feed: Feed | None = None,
) -> None:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from pysteer.metrics import SteerCollector, serve  # noqa: PLC0415

    registry = CollectorRegistry()
    store = feed.report if feed is not None else None
    registry.register(SteerCollector(steerer, certificates, name, store))
    try:
        if namespace:
            call_in(namespace, serve, registry, metrics)
        else:
            serve(registry, metrics)
    except OSError as exc:
        raise DaemonError(f"cannot serve metrics on {metrics[0]}:{metrics[1]}: {exc}") from None
