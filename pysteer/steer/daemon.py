"""``pysteer steer run``: the steering daemon, serving its control API on a unix socket.

The flow table, hosts and counters are pinned maps, so a killed daemon leaves steering
running in the kernel and a restarted one takes over the same flows. Only one daemon may
own an instance (a lock next to its socket); it holds no network port.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from pysteer.metrics import setup_logging
from pysteer.netns import call_in
from pysteer.steer.control import RUN_DIR, LineReader, socket_path
from pysteer.steer.flow import Flow, FlowSyntaxError
from pysteer.steer.maps import Action
from pysteer.steer.steerer import Steerer, SteerError

log = logging.getLogger("pysteer.steer")


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why."""


def _flow_row(flow: Flow, value: Any, hosts: dict[int, str], park: Any) -> dict[str, Any]:
    action = Action(value.action)
    return {
        "parked": park.parked,
        "replayed": park.replayed,
        "park_dropped": park.dropped,
        "park_lost": park.lost,
        "flow": str(flow),
        "action": action.name,
        "host": hosts.get(value.host) if action == Action.TO else None,
        "packets": {a.name.lower(): value.packets[a] for a in Action},
        "bytes": {a.name.lower(): value.bytes[a] for a in Action},
        "park_seq": value.park_seq,
    }


class Daemon:
    def __init__(self, steerer: Steerer, path: Path) -> None:
        self.steerer, self.path = steerer, path
        self._stop = threading.Event()
        self._tls_server: socket.socket | None = None

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        try:
            if cmd in ("flows", "hosts", "stats"):
                return {"ok": True, cmd: self._show(cmd)}
            if cmd in ("park", "to", "pass", "forget"):
                return {"ok": True} | self._change(cmd, req)
            if cmd == "divert":
                return self._divert(req)
            if cmd == "diversions":
                return {"ok": True, "diversions": self.steerer.diversions()}
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        except (SteerError, FlowSyntaxError) as exc:
            return {"ok": False, "error": str(exc)}

    def _show(self, what: str) -> Any:
        st = self.steerer
        if what == "flows":
            hosts = st.items_by_host()
            return [_flow_row(f, v, hosts, st.park_counters(f)) for f, v in st.items()]
        if what == "hosts":
            return [{"name": h.name, "ifname": h.ifname, "mac": h.mac.hex(":"), "id": h.id}
                    for h in st.hosts.values()]  # fmt: skip
        parked = st.counters.values()
        return st.stats() | {
            "replayed": sum(c.replayed for c in parked),
            "park_dropped": sum(c.dropped for c in parked),
            "park_lost": sum(c.lost for c in parked),
        }

    def _divert(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            address = ipaddress.ip_address(str(req.get("address")))
        except ValueError:
            return {"ok": False, "error": f"divert: not an address: {req.get('address')!r}"}
        host = req.get("host")
        self.steerer.divert(address, None if host is None else str(host))
        return {"ok": True, "diversions": self.steerer.diversions()}

    def _change(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        st = self.steerer
        flow = Flow.parse(str(req.get("flow", "")))
        if cmd == "park":
            action, host = st.park(flow)
            return {"was": action.name if action is not None else None, "host": host}
        elif cmd == "to":
            return {"replayed": st.to(flow, str(req.get("host")))}
        elif cmd == "pass":
            if st.get(flow) is None:
                raise SteerError(f"flow {flow} is not in the table")
            host = req.get("host")
            return {"replayed": st.pass_(flow, replay_to=None if host is None else str(host))}
        else:
            st.forget(flow)
        return {}

    def _client(self, conn: socket.socket) -> None:
        """Answer requests, one per line, until the client hangs up (agents keep it open)."""
        with conn:
            reader = LineReader(conn)
            while (data := reader.line()).endswith(b"\n"):
                try:
                    req = json.loads(data)
                    answer = self.handle(req) if isinstance(req, dict) else {"ok": False}
                except json.JSONDecodeError:
                    answer = {"ok": False, "error": "requests are one JSON object per line"}
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    return

    def serve(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            old = os.umask(0o177)
            try:
                server.bind(str(self.path))  # mode 0600
            finally:
                os.umask(old)
            server.listen()
            server.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def listen_tls(
        self, address: tuple[str, int], context: ssl.SSLContext, namespace: str | None = None
    ) -> None:
        """Also serve remote agents on TCP (in ``namespace``), mutually authenticated."""
        try:
            server = call_in(namespace, socket.create_server, address) if namespace else \
                socket.create_server(address)  # fmt: skip
        except OSError as exc:
            raise DaemonError(
                f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        server.settimeout(0.2)
        self._tls_server = server

        def accept_loop() -> None:
            while not self._stop.is_set():
                try:
                    raw, _ = server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._tls_client, args=(raw, context), daemon=True).start()
            server.close()

        threading.Thread(target=accept_loop, daemon=True).start()

    def _tls_client(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        raw.settimeout(10)
        try:
            conn = context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raw.close()  # no valid client certificate: nothing is answered
            log.warning("refused a control connection: %s", exc)
            return
        conn.settimeout(None)  # agents keep their connection open between migrations
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client(conn)

    def stop(self, *_: object) -> None:
        self._stop.set()


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
) -> int:
    """Run until SIGTERM/SIGINT. The programs stay attached and the maps pinned."""
    setup_logging(log_json)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    lock = open(RUN_DIR / f"steer-{name}.lock", "w")  # noqa: SIM115 - held for our lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DaemonError(
            f"another steering daemon already runs instance {name!r} "
            f"(pin path /sys/fs/bpf/pysteer/{name})"
        ) from None
    steerer = Steerer(name, ifname, namespace=namespace, mode=mode, max_flows=max_flows,
                      max_per_flow=max_parked)  # fmt: skip
    for host, where, given_mac in hosts:
        host_if, mac = where, given_mac
        if not given_mac:  # NAME=ADDRESS: find its link and MAC
            try:
                host_if, mac = steerer.resolve(where)
            except SteerError as exc:
                steerer.close(detach=True)
                raise DaemonError(f"--host {host}: {exc}") from None
        steerer.add_host(host, host_if, mac)
    daemon = Daemon(steerer, socket_path(name))
    if listen is not None:
        if tls is None:
            raise DaemonError("a TCP control listener needs mutual TLS (certificate, key, CA)")
        daemon.listen_tls(listen, tls, namespace)
    if metrics is not None:
        from prometheus_client import CollectorRegistry  # noqa: PLC0415

        from pysteer.metrics import SteerCollector, serve  # noqa: PLC0415

        registry = CollectorRegistry()
        registry.register(SteerCollector(steerer))
        try:
            if namespace:
                call_in(namespace, serve, registry, metrics)
            else:
                serve(registry, metrics)
        except OSError as exc:
            raise DaemonError(f"cannot serve metrics on {metrics[0]}:{metrics[1]}: {exc}") from None
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    log.info("steering %s (%s) as %r; control at %s", ifname, steerer.mode, name, daemon.path)
    try:
        daemon.serve()
    finally:
        steerer.close()
        lock.close()
    return 0
