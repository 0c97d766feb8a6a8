"""An agent as N worker processes, to use N cores: the supervisor.

A node whose cluster file says ``workers = N`` (N > 1) runs this instead of one agent:

- **N workers**, each a whole agent (``pysteer.agent.agent``) for its share of the node's
  connections. Their VIP listeners share each port (SO_REUSEPORT: the kernel spreads new
  connections); worker I listens for peers on the node's control port + I and keeps its own
  import ledger. A migration's requests all go to the worker its id routes to
  (``transfer.blob.worker_of``), which alone fences replays of that id. Each worker moves
  its own connections out (its own freeze slots, links and steering-node calls).
- **The supervisor** (this module) starts them, restarts one that dies (its connections died
  with it; the steering node's entries for them are dropped by the next sync), serves the
  node's control socket for the CLI by asking every worker and merging the answers, and
  syncs the union of the workers' flows with the steering node (a worker's list alone would
  have its siblings' entries dropped as stale).

Signals: SIGTERM and SIGINT go to every worker (each drains its share to ``drain_to``, as
one agent would) and the supervisor exits once all have; SIGHUP goes to every worker and
reloads the supervisor's own certificate. Workers get SIGTERM if the supervisor dies.
Metrics: worker I serves them on the ``--metrics`` port + I.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysteer.agent.agent import LINKS, AgentError, control_path
from pysteer.agent.argv import agent_argv
from pysteer.agent.links import LinkPool, SteerLink
from pysteer.agent.reconcile import NotNow
from pysteer.agent.steering import Steering
from pysteer.cluster.config import ClusterConfig, ConfigError, load_config
from pysteer.deathsig import die_with_parent
from pysteer.identity import client_context
from pysteer.rpc import aio

log = logging.getLogger("pysteer.agent")

START_TIMEOUT = 60.0  # seconds a worker may take to answer on its control socket
# Seconds a worker may take to answer a forwarded request: less than the CLI waits (10 s),
# so that a stopped or stuck worker is named in the answer, not a silent node. A move may
# take its own timeout, and then some to learn its outcome.
ASK_TIMEOUT = 6.0
MOVE_SLACK = 25.0
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # back-off of a worker that keeps dying
HEALTHY = 60.0  # seconds a restarted worker must live for its back-off to start again
MAX_CONTROL_REQUEST = 64 << 10


class Worker:
    """One worker process and its control socket."""

    def __init__(self, index: int, argv: list[str], path: Path) -> None:
        self.index, self.argv, self.path = index, argv, path
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket must not pass for this one's
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, preexec_fn=die_with_parent(signal.SIGTERM)
        )

    async def ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until it answers on its control socket (AgentError if it exits first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.proc is not None  # noqa: S101
            if self.proc.returncode is not None:
                raise AgentError(f"worker {self.index} exited with {self.proc.returncode}")
            try:
                conn = await aio.open_unix(self.path, f"worker {self.index}", 1.0)
            except OSError:
                if loop.time() > deadline:
                    raise AgentError(
                        f"worker {self.index} did not start in {timeout:g} s"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            conn.close()
            return

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request's answer (``ok`` False with the reason if the worker cannot say)."""
        silent = {
            "ok": False,
            "error": f"worker {self.index} (pid {self.pid}) answered nothing within "
            f"{ASK_TIMEOUT:g} s (stopped, or overloaded?)",
        }
        try:
            conn = await aio.open_unix(self.path, f"worker {self.index}", ASK_TIMEOUT)
        except TimeoutError:
            return silent
        except OSError as exc:
            why = str(exc) or type(exc).__name__
            return {"ok": False, "error": f"worker {self.index} is unreachable: {why}"}
        limit = ASK_TIMEOUT
        if request.get("cmd") == "migrate":
            move = request.get("timeout_s", 5.0)
            # A proxy connection may wait its timeout for a boundary, then move in another.
            limit = 2 * (move if isinstance(move, int | float) else 5.0) + MOVE_SLACK
        try:
            return await asyncio.wait_for(conn.exchange(request), limit)
        except TimeoutError:
            return silent | {"error": silent["error"].replace(f"{ASK_TIMEOUT:g} s", f"{limit:g} s")}
        except OSError as exc:  # the RPC's ProtocolError among them
            return {"ok": False, "error": f"worker {self.index}: {str(exc) or type(exc).__name__}"}
        finally:
            conn.close()


class Supervisor:
    def __init__(
        self,
        config: ClusterConfig,
        node: str,
        *,
        options: Callable[[int], list[str]],
        sync_interval: float = 30.0,
    ) -> None:
        """``options(i)``: more ``agent run`` options for worker ``i`` (metrics, logs)."""
        self.config, self.name = config, node
        me = config.node(node)
        self.workers = [
            Worker(
                i,
                agent_argv(config.path, node, "--worker", str(i), *options(i)),
                control_path(config.name, node, i),
            )
            for i in range(me.workers)
        ]
        self.path = control_path(config.name, node)
        self._load_tls()
        self.steering = Steering(  # each steering node kept true for all the workers
            config.steers,
            lambda s: LinkPool(functools.partial(self._steer_link, s.name, s.control), size=LINKS),
            host=node,
            served=self._served,
            interval=sync_interval,
        )
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    def _load_tls(self, config: ClusterConfig | None = None) -> None:
        config = config or self.config
        me = config.node(self.name)
        try:
            self.client_tls = client_context(me.cert, me.key, config.ca)
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(
                f"node {self.name}: cannot load its certificate or the CA: {exc}"
            ) from None

    def _steer_link(self, name: str, address: tuple[str, int]) -> SteerLink:
        return SteerLink(name, address, self.client_tls, self.config.names())

    def reload(self) -> None:
        for worker in self.workers:
            worker.signal(signal.SIGHUP)
        try:
            config = load_config(self.config.path)
            self._load_tls(config)
        except (ConfigError, AgentError) as exc:
            log.error("reload refused, keeping the current certificates: %s", exc)
            return
        log.info("supervisor of %s reloaded its certificate and the CA", self.name)
        self.config = dataclasses.replace(
            self.config, steer=config.steer, more_steers=config.more_steers
        )
        if changes := self.steering.update(config.steers):
            log.info("steering nodes: %s", ", ".join(changes))

    # --- lifecycle -------------------------------------------------------------------------
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            for worker in self.workers:
                await worker.spawn()
            await asyncio.gather(*(w.ready() for w in self.workers))
        except (AgentError, OSError) as exc:
            await self._end_workers()
            raise AgentError(f"agent {self.name}: {exc}") from None
        server = await aio.serve_unix(self.path, self._control)
        for worker in self.workers:
            self._spawn(self._watch(worker))
        self.steering.reconcile(self._spawn)
        log.info(
            "agent %s: %d workers (pids %s); control at %s",
            self.name,
            len(self.workers),
            ", ".join(str(w.proc.pid) for w in self.workers if w.proc),
            self.path,
        )
        try:
            await self._stop.wait()
            log.info("stopping: %d workers drain or end their connections", len(self.workers))
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await self._end_workers()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        log.info("agent %s stopped", self.name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_workers(self) -> None:
        """SIGTERM to each (it drains as the cluster file says), and wait for all."""
        timeout = self.config.node(self.name).drain_timeout + 30.0
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout
        )
        if pending:
            log.error("stopping: %d worker(s) did not end in %g s: killed", len(pending), timeout)
            for worker in self.workers:
                worker.signal(signal.SIGKILL)
            await asyncio.wait(pending, timeout=5)

    async def _watch(self, worker: Worker) -> None:
        """Restart a worker that died while we were not stopping."""
        loop = asyncio.get_running_loop()
        while True:
            assert worker.proc is not None  # noqa: S101
            started = loop.time()
            code = await worker.proc.wait()
            if self._stop.is_set():
                return
            if loop.time() - started > HEALTHY:
                worker.restarts = 0
            delay = RESTART_DELAYS[min(worker.restarts, len(RESTART_DELAYS) - 1)]
            worker.restarts += 1
            log.error(
                "worker %d (pid %d) exited with %s: its connections are gone; restarting it "
                "in %g s",
                worker.index,
                worker.proc.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            if self._stop.is_set():
                return
            try:
                await worker.spawn()
                await worker.ready()
            except (AgentError, OSError) as exc:
                log.error("worker %d did not start again: %s", worker.index, exc)
                continue
            log.info("worker %d is back (pid %d)", worker.index, worker.proc.pid)

    async def _served(self) -> list[str]:
        answers = await self._ask_all({"cmd": "served"})
        flows: list[str] = []
        for worker, answer in zip(self.workers, answers, strict=True):
            if not answer.get("ok"):
                raise NotNow(f"worker {worker.index}: {answer.get('error')}")
            flows += answer["flows"]
        return flows

    async def _ask_all(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.ask(request) for w in self.workers)))

    # --- the node's control socket --------------------------------------------------------
    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = aio.Connection(reader, writer, max_frame=MAX_CONTROL_REQUEST)

        async def answer(req: dict[str, Any]) -> dict[str, Any] | None:
            if req.get("cmd") == "drain":
                await self._drain(req, conn)
                return None
            try:
                return await self._fan_out(req)
            except Exception as exc:  # a bug must answer, not kill the control connection
                log.exception("control request %.40r failed", req.get("cmd"))
                return {"ok": False, "error": f"internal error ({type(exc).__name__}); see the log"}

        await aio.serve_local(conn, answer, f"this agent ({self.name})", log)

    async def _fan_out(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911 - dispatch
        cmd = req.get("cmd")
        if cmd == "resolve":  # the worker that holds it decides; one at a time
            last: dict[str, Any] = {}
            for worker in self.workers:
                last = await worker.ask(req)
                if last.get("ok") or last.get("code") != "absent":
                    return last
            return last
        answers = await self._ask_all(req)
        if cmd == "migrate":  # the one worker that serves the flow moves it
            for answer in answers:
                if answer.get("ok") or answer.get("code") != "absent":
                    return answer
            return answers[0]
        failed = [a for a in answers if not a.get("ok")]
        if failed:
            return failed[0]
        if cmd in ("flows", "served"):
            key = "flows"
            out = []
            for worker, answer in zip(self.workers, answers, strict=True):
                items = answer[key]
                out += [f | {"worker": worker.index} for f in items] if cmd == "flows" else items
            return {"ok": True, key: out}
        if cmd == "migrations":
            return {
                "ok": True,
                "migrations": [m for a in answers for m in a["migrations"]],
                "recent": [m for a in answers for m in a["recent"]][-50:],
            }
        if cmd == "status":
            return {"ok": True, "status": self._status([a["status"] for a in answers])}
        if cmd in ("cordon", "uncordon"):
            return {"ok": True, "accepting": all(a["accepting"] for a in answers)}
        return answers[0]

    def _status(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        status = dict(parts[0])
        for key in ("connections", "claiming", "inflight"):
            status[key] = sum(p[key] for p in parts)
        status["in_doubt"] = sorted(m for p in parts for m in p["in_doubt"])
        status["accepting"] = all(p["accepting"] for p in parts)
        counts: dict[str, int] = {}
        for part in parts:
            for outcome, n in part["migrations"].items():
                counts[outcome] = counts.get(outcome, 0) + n
        status["migrations"] = counts
        status["pid"] = os.getpid()
        status["control"] = "{}:{}".format(*self.config.node(self.name).control)
        status["workers"] = [
            {
                "worker": w.index,
                "pid": p["pid"],
                "connections": p["connections"],
                "restarts": w.restarts,
            }
            for w, p in zip(self.workers, parts, strict=True)
        ]
        return status

    async def _drain(self, req: dict[str, Any], client: aio.Connection) -> None:
        """Every worker drains its share side by side; the client sees one drain: summed
        progress, then one summary. A frame from the client (or its hanging up) stops all."""
        links: list[aio.Connection] = []
        try:
            for worker in self.workers:
                try:
                    links.append(await aio.open_unix(worker.path, f"worker {worker.index}"))
                except OSError as exc:
                    await client.answer({"ok": False, "error": f"worker {worker.index}: {exc}"})
                    return
            # --batch is the node's migrations in flight at once: each worker takes its part.
            batch = req.get("batch", 32)
            if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
                req = req | {"batch": max(1, batch // len(links))}
            for link in links:
                await link.send(req)
            await self._relay_drain(links, client)
        finally:
            for link in links:
                link.close()

    async def _relay_drain(self, links: list[aio.Connection], client: aio.Connection) -> None:
        progress: list[dict[str, Any] | None] = [None] * len(links)
        finals: list[dict[str, Any]] = []

        async def follow(i: int, link: aio.Connection) -> None:
            while True:
                try:
                    message = await link.receive()
                except OSError as exc:
                    message = {"ok": False, "error": f"worker {self.workers[i].index}: {exc}"}
                if message is None:
                    message = {"ok": False, "error": f"worker {self.workers[i].index} hung up"}
                if message.get("ok") and "progress" in message:
                    progress[i] = message["progress"]
                    if all(p is not None for p in progress):
                        with contextlib.suppress(OSError):
                            await client.answer({"ok": True, "progress": _sum(progress)})
                    continue
                finals.append(message)
                return

        async def watch() -> None:
            with contextlib.suppress(OSError):
                await client.receive()
            for link in links:
                with contextlib.suppress(OSError):
                    await link.send({"cmd": "stop"})

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await asyncio.gather(*(follow(i, link) for i, link in enumerate(links)))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        summaries = [f["drain"] for f in finals if f.get("ok")]
        errors = [f for f in finals if not f.get("ok")]
        if not summaries:
            await client.answer(errors[0])
            return
        summary = _merge_summaries(summaries)
        if errors:
            summary["errors"] = [e.get("error") for e in errors]
        log.info(
            "drain %s -> %s%s: %d moved, %d rolled back, %d failed, %d still here",
            self.name,
            summary["to"],
            " (interrupted)" if summary["interrupted"] else "",
            summary["moved"],
            summary["rolled_back"],
            summary["failed"],
            len(summary["remaining"]),
        )
        with contextlib.suppress(OSError):
            await client.answer({"ok": True, "drain": summary})


def _sum(parts: list[Any]) -> dict[str, int]:
    keys = ("moved", "rolled_back", "not_movable", "failed", "total")
    return {k: sum(int(p.get(k, 0)) for p in parts) for k in keys}


def _merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One drain's summary from the workers' (percentiles: the worst worker's, a bound)."""
    merged = dict(parts[0])
    for key in ("moved", "rolled_back", "not_movable", "failed"):
        merged[key] = sum(p.get(key, 0) for p in parts)
    merged["interrupted"] = any(p["interrupted"] for p in parts)
    merged["seconds"] = max(p["seconds"] for p in parts)
    seconds = merged["seconds"]
    merged["per_second"] = round(merged["moved"] / seconds, 1) if seconds else None
    merged["freeze_ms"] = {
        k: max((p["freeze_ms"][k] for p in parts if p["freeze_ms"][k] is not None), default=None)
        for k in ("p50", "p90", "p99", "max")
    }
    merged["steps_ms"] = {
        step: _worst([p["steps_ms"][step] for p in parts if step in p["steps_ms"]])
        for step in dict.fromkeys(k for p in parts for k in p["steps_ms"])
    }
    merged["remaining"] = sorted(f for p in parts for f in p["remaining"])
    merged["not_moved"] = [n for p in parts for n in p["not_moved"]]
    merged["not_movable_flows"] = [n for p in parts for n in p.get("not_movable_flows", [])]
    merged["workers"] = [
        {k: p[k] for k in ("moved", "rolled_back", "failed", "seconds", "per_second", "freeze_ms")}
        for p in parts
    ]
    return merged


def _worst(spreads: list[dict[str, Any]]) -> dict[str, Any]:
    """Spreads of several workers as one: counts add up, each percentile is the worst."""
    out: dict[str, Any] = {"n": sum(s["n"] for s in spreads)}
    for key in ("p50", "p90", "p99", "max"):
        out[key] = max((s[key] for s in spreads if s[key] is not None), default=None)
    return out


def run(
    config: ClusterConfig,
    node: str,
    *,
    options: Callable[[int], list[str]],
    sync_interval: float = 30.0,
) -> int:
    """``pysteer agent run`` of a node with ``workers`` > 1: supervise until SIGTERM."""
    supervisor = Supervisor(config, node, options=options, sync_interval=sync_interval)
    asyncio.run(supervisor.serve())
    return 0
