"""The operator's commands: ``pysteer agent``, ``migrate``, ``flows`` and ``status``.

They read the cluster file (``--config`` or ``PYSTEER_CONFIG``) and talk to each node's
agent on its local control socket. Bad input exits 2 and changes nothing; a migration
that ran and rolled back exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pysteer import exitcodes
from pysteer.agent.control import AgentDown, AgentRefused, AgentSilent, Stream, ask, ask_remote
from pysteer.clitable import Command, arg, one_of, print_table
from pysteer.cluster.config import ENV, ClusterConfig, load_config
from pysteer.errors import UsageError
from pysteer.flow import Flow

if TYPE_CHECKING:
    import ssl


CONFIG = arg("--config", type=Path, help=f"the cluster file (default: ${ENV})")
JSON = arg("--json", action="store_true", help="machine-readable output")
# --node NODE, as everywhere; the positional NODE is its old spelling (a deprecated alias).
NODE = (
    arg("--node", metavar="NODE", help="the node, by its name in the cluster file"),
    arg("old_node", metavar="NODE", nargs="?", help="(deprecated: use --node)"),
)
# A move takes milliseconds, but a budget below this would only ever time out and roll back.
MIN_TIMEOUT = 0.1


def _path(cfg: ClusterConfig, node: str) -> Path:
    from pysteer.agent.agent import control_path  # noqa: PLC0415 - keeps --help light

    return control_path(cfg.name, node)


def _ask(cfg: ClusterConfig, node: str, cmd: str, **args: Any) -> dict[str, Any]:
    """Ask ``node``'s agent: on its local socket if it runs here, else over mutual TLS with
    a cluster certificate this machine holds (a node's certificate and key).

    TCP goes only where the cluster file says it stays ours: from inside the node's
    namespace (``netns``), or from here to a node marked ``remote``. A guess would send a
    TLS handshake out of the default route, to a network that is not ours."""
    path = _path(cfg, node)
    if path.exists():
        return ask(path, cmd, **args)
    conf = cfg.node(node)
    if conf.netns is None and not conf.remote:
        raise AgentDown(
            f"no agent at {path}; not asked over TCP, since the cluster file "
            f"gives {node} neither netns nor remote = true"
        )
    context = _identity(cfg)
    if context is None:
        raise AgentDown(f"no agent at {path}, and no node key readable here to reach it")
    return ask_remote(conf.control, context, node, cmd, netns=conf.netns, names=cfg.names(), **args)


def _identity(cfg: ClusterConfig) -> ssl.SSLContext | None:
    import ssl  # noqa: PLC0415 - only to reach another machine's agent

    from pysteer.identity import client_context  # noqa: PLC0415

    # Prefer the node whose agent runs here; any readable node key otherwise.
    names = sorted(cfg.nodes, key=lambda n: not _path(cfg, n).exists())
    for name in names:
        node = cfg.nodes[name]
        try:
            return client_context(node.cert, node.key, cfg.ca)
        except (OSError, ssl.SSLError):
            continue
    return None


@contextlib.contextmanager
def _naming(down: str = "", refused: str = "") -> Iterator[None]:
    """AgentDown and AgentRefused with what the caller knows (``node b is down: ``) put
    before their message; the exit-code map reports them."""
    try:
        yield
    except AgentSilent as exc:  # there, but silent: not "down"
        raise AgentSilent(down.replace(" is down: ", " is not answering: ") + str(exc)) from None
    except AgentDown as exc:
        raise AgentDown(f"{down}{exc}") from None
    except AgentRefused as exc:
        raise AgentRefused(f"{refused}{exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from pysteer.agent.agent import run  # noqa: PLC0415 - needs the TLS stack
    from pysteer.harden import harden  # noqa: PLC0415
    from pysteer.metrics import parse_listen  # noqa: PLC0415

    harden()  # before any key is read: no core dump holds one
    cfg = load_config(args.config)
    node = cfg.node(args.node).name
    try:
        metrics = parse_listen(args.metrics) if args.metrics else None
    except ValueError as exc:
        raise UsageError(f"--metrics: {exc}") from None
    if not (math.isfinite(args.sync_interval) and 1 <= args.sync_interval <= 3600):
        raise UsageError("--sync-interval must be in [1, 3600] seconds")
    workers = cfg.node(node).workers
    if args.worker is not None and not 0 <= args.worker < workers:
        raise UsageError(f"--worker: {node} has workers 0..{workers - 1} (cluster file)")
    if workers > 1 and args.worker is None:
        return _supervise(cfg, node, args, metrics)
    return run(
        cfg,
        node,
        metrics=metrics,
        log_json=args.log_json,
        sync_interval=args.sync_interval,
        worker=args.worker,
    )


def _supervise(
    cfg: ClusterConfig, node: str, args: argparse.Namespace, metrics: tuple[str, int] | None
) -> int:
    """A node with ``workers`` > 1: its supervisor runs them (pysteer.agent.supervisor)."""
    from pysteer.agent.supervisor import run as supervise  # noqa: PLC0415
    from pysteer.metrics import setup_logging  # noqa: PLC0415

    if metrics is not None and metrics[1] + cfg.node(node).workers - 1 > 65535:
        raise UsageError("--metrics: worker I serves on PORT + I, past 65535 here")

    def options(worker: int) -> list[str]:
        out = ["--sync-interval", str(args.sync_interval)]
        if metrics is not None:
            host = f"[{metrics[0]}]" if ":" in metrics[0] else metrics[0]
            out += ["--metrics", f"{host}:{metrics[1] + worker}"]
        return out + (["--log-json"] if args.log_json else [])

    setup_logging(args.log_json)
    return supervise(cfg, node, options=options, sync_interval=args.sync_interval)


def cmd_cordon(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    node = cfg.node(one_of(args.node, args.old_node, "--node NODE")).name
    with _naming(down=f"node {node} is down: ", refused=f"node {node}: "):
        answer = _ask(cfg, node, args.what)
    if args.json:
        print(json.dumps({"node": node, "accepting": answer["accepting"]}))
    else:
        print(f"{node}: {'accepts' if answer['accepting'] else 'refuses'} imports")
    return 0


def _all_flows(
    cfg: ClusterConfig, nodes: list[str]
) -> tuple[list[dict[str, Any]], dict[str, AgentDown | AgentRefused]]:
    """Every flow the ``nodes`` serve, and why each node that did not answer did not."""
    flows: list[dict[str, Any]] = []
    down: dict[str, AgentDown | AgentRefused] = {}
    for node in nodes:
        try:
            flows += _ask(cfg, node, "flows")["flows"]
        except (AgentDown, AgentRefused) as exc:
            down[node] = exc
    return flows, down


def _unreachable(node: str, why: AgentDown | AgentRefused) -> AgentDown:
    """The error for a node that did not answer, with its reason (a version refused, say)."""
    if isinstance(why, AgentSilent):
        return AgentSilent(f"node {node} is not answering: {why}")
    return AgentDown(f"node {node} is down: {why}")


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    flow = Flow.parse(args.flow)
    target = cfg.node(args.to).name
    if not (math.isfinite(args.timeout) and MIN_TIMEOUT <= args.timeout <= 600):
        raise UsageError(
            f"--timeout must be in [{MIN_TIMEOUT:g}, 600] seconds, not {args.timeout:g}"
        )
    flows, down = _all_flows(cfg, sorted(cfg.nodes))
    owners = [f["node"] for f in flows if f["flow"] == str(flow)]
    if not owners and down:  # it may be on a node that does not answer
        raise AgentDown(f"flow {flow} not found on any node that answers (down: {', '.join(down)})")
    if not owners:
        raise UsageError(f"flow {flow} not found on any node; see `pysteer flows`")
    source = owners[0]
    if source == target:
        raise UsageError(f"flow {flow} is already on {target}")
    if target in down:
        raise _unreachable(target, down[target])
    with _naming(down=f"node {source} is down: "):
        answer = _ask(
            cfg,
            source,
            "migrate",
            timeout=2 * args.timeout + 30,  # a proxy's wait for its boundary, then the move
            flow=str(flow),
            to=target,
            timeout_s=args.timeout,
        )
    report = answer["migration"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_describe(report))
    return 0 if report["outcome"] == "moved" else 1


def cmd_drain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    source, target = cfg.node(args.source).name, cfg.node(args.target).name
    if source == target:
        raise UsageError("--from and --to are the same node")
    if not 1 <= args.batch <= 4096:
        raise UsageError(f"--batch must be 1..4096, not {args.batch}")
    if not (math.isfinite(args.timeout) and MIN_TIMEOUT <= args.timeout <= 600):
        raise UsageError(
            f"--timeout must be in [{MIN_TIMEOUT:g}, 600] seconds, not {args.timeout:g}"
        )
    flows, down = _all_flows(cfg, [source, target])
    for node, why in down.items():
        raise _unreachable(node, why)
    mine = sorted(f["flow"] for f in flows if f["node"] == source)
    if args.dry_run and args.json:
        print(json.dumps({"dry_run": True, "from": source, "to": target, "flows": mine}))
        return 0
    if args.dry_run:
        for flow in mine:
            print(flow)
        print(
            f"would move {len(mine)} flow(s) from {source} to {target}, and send new "
            f"connections to {target}"
        )
        return 0
    stream = Stream(
        _path(cfg, source), "drain", to=target, batch=args.batch, timeout_s=args.timeout
    )
    answer = _follow(stream, source)
    summary = answer["drain"]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_drain(summary)
    if summary["interrupted"]:
        return 130
    return 0 if not summary["remaining"] and not summary["not_moved"] else 1


def _follow(stream: Stream, source: str) -> dict[str, Any]:
    """Show the drain's progress until its summary; Ctrl-C asks it to stop (twice: leave)."""
    bar = _Progress(sys.stderr.isatty())
    stopping = False

    def on_sigint(_sig: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            raise KeyboardInterrupt
        stopping = True
        print(
            "\nstopping after the batch in flight (Ctrl-C again to leave now)",
            file=sys.stderr,
            flush=True,
        )
        stream.stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with _naming(down=f"node {source}: "):
            while "progress" in (answer := stream.next()):
                bar.show(answer["progress"])
            return answer
    finally:
        signal.signal(signal.SIGINT, previous)
        stream.close()
        bar.done()


class _Progress:
    def __init__(self, tty: bool) -> None:
        self.tty, self.shown = tty, False

    def show(self, p: dict[str, Any]) -> None:
        done = p["moved"] + p["rolled_back"] + p.get("not_movable", 0) + p["failed"]
        text = (
            f"{done}/{p['total']} done: {p['moved']} moved, {p['rolled_back']} rolled "
            f"back, {p['failed']} failed"
        )
        if self.tty:
            width = 30
            filled = width * done // max(p["total"], 1)
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {text}",
                end="",
                flush=True,
                file=sys.stderr,
            )
            self.shown = True
        else:
            print(text, flush=True, file=sys.stderr)

    def done(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def _print_drain(s: dict[str, Any]) -> None:
    f = s["freeze_ms"]
    head = "drain interrupted" if s["interrupted"] else "drain done"
    print(
        f"{head}: {s['from']} -> {s['to']}: {s['moved']} moved, {s['rolled_back']} rolled "
        f"back, {s.get('not_movable', 0)} not movable, {s['failed']} failed in "
        f"{s['seconds']:.2f} s ({s['per_second']}/s)"
    )
    if f["p50"] is not None:
        print(
            f"freeze window: p50 {f['p50']} ms, p90 {f['p90']} ms, p99 {f['p99']} ms, "
            f"max {f['max']} ms"
        )
    for r in s["not_moved"]:
        print(f"  not moved: {r['flow']} ({r['outcome']}: {r['error']})")
    unmovable = s.get("not_movable_flows", [])
    if unmovable:
        print(f"{len(unmovable)} connection(s) cannot move and stay on {s['from']} until they end:")
        for r in unmovable:
            print(f"  {r['flow']}: {r['reason']}")
    if s["remaining"]:
        print(f"{len(s['remaining'])} flow(s) still served by {s['from']}:")
        for flow in s["remaining"]:
            print(f"  {flow}")
    else:
        print(f"{s['from']} serves no flow; new connections go to {s['to']}")


def cmd_undrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    node = cfg.node(one_of(args.node, args.old_node, "--node NODE")).name
    with _naming(down=f"node {node} is down: "):
        _ask(cfg, node, "undrain")
    if args.json:
        print(json.dumps({"node": node, "accepting": True, "drained_to": None}))
    else:
        print(f"{node} takes new connections again")
    return 0


def _describe(r: dict[str, Any]) -> str:
    head = f"{r['flow']}: {r['from']} -> {r['to']}: {r['outcome']}"
    if r["outcome"] == "moved":
        parked = r.get("parked_ms")
        at_steer = f", {parked:.3f} ms parked at the steering node" if parked is not None else ""
        return (
            f"{head}, freeze window {r['freeze_ms']:.3f} ms{at_steer} "
            f"({r['replayed']} parked packet(s) replayed)"
        )
    return f"{head}: {r['error']}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_flows(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    nodes = [cfg.node(args.node).name] if args.node else sorted(cfg.nodes)
    flows, down = _all_flows(cfg, nodes)
    if args.node and down:
        raise _unreachable(args.node, down[args.node])
    if args.json:
        print(json.dumps({"flows": flows, "down": sorted(down)}, indent=2))
        return 0
    rows = [("NODE", "FLOW", "KIND", "AGE", "IN", "OUT", "APP")]
    for f in sorted(flows, key=lambda f: (f["node"], f["flow"])):
        kind = f"TLS {f['tls']['version']} {f['tls']['suite']}" if f["tls"] else "TCP"
        rows.append(
            (
                f["node"],
                f["flow"],
                kind,
                _age(f["age"]),
                str(f["bytes_in"]),
                str(f["bytes_out"]),
                f["app"],
            )
        )
    print_table(rows)
    for node in down:
        print(f"({node}: down)")
    return 0


def cmd_migrations(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    nodes = [cfg.node(args.node).name] if args.node else sorted(cfg.nodes)
    rows, down = [], []
    for node in nodes:
        try:
            rows += [m | {"node": node} for m in _ask(cfg, node, "migrations")["migrations"]]
        except (AgentDown, AgentRefused):
            down.append(node)
    if args.json:
        print(json.dumps({"migrations": rows, "down": down}, indent=2))
        return 0
    table = [("NODE", "ID", "FLOW", "FROM", "TO", "ROLE", "STATE", "AGE")]
    for m in rows:
        table.append(
            (
                m["node"],
                m["id"][:12],
                m["flow"],
                m["from"],
                m["to"],
                m["role"],
                m["state"],
                _age(m["age_s"]),
            )
        )
    if len(table) == 1:
        print("no migration in flight or in-doubt")
    else:
        print_table(table)
    for node in down:
        print(f"({node}: down)")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not re.fullmatch(r"[0-9a-f]{4,32}", args.id):
        raise UsageError(
            f"{args.id!r} is not a migration id (hex, as `pysteer migrations` shows it)"
        )
    done, down = [], []
    for node in sorted(cfg.nodes):
        try:
            answer = _ask(cfg, node, "resolve", id=args.id, keep=args.keep)
        except AgentRefused:
            continue  # not held there
        except AgentDown:
            down.append(node)
            continue
        done.append({"node": node, "id": answer["resolved"], "outcome": answer["outcome"]})
    if args.json:
        print(json.dumps({"resolved": done, "down": down}, indent=2))
    for d in done:
        if not args.json:
            print(f"{d['node']}: migration {d['id'][:12]}: {d['outcome']}")
    for node in down:
        print(f"({node}: down, not asked)", file=sys.stderr)
    if not done:
        print(f"no node holds an in-doubt migration {args.id}", file=sys.stderr)
        return 1
    return 0


def _expiry(path: Path) -> dict[str, Any]:
    import datetime  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415 - only status reads certificates

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:  # a host holds only its own bundle (pysteer certs bundle)
        return {"file": str(path), "here": False}
    except (OSError, ValueError) as exc:
        return {"file": str(path), "error": getattr(exc, "strerror", None) or str(exc)}
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return {
        "file": str(path),
        "expires": cert.not_valid_after_utc.isoformat(),
        "days_left": round(left.total_seconds() / 86400, 1),
    }


def _shown_expiry(c: dict[str, Any]) -> str:
    if "expires" in c:
        return f"expires {c['expires'][:10]} ({c['days_left']} days)"
    return "not on this host" if c.get("here") is False else f"unreadable: {c['error']}"


def _node_lines(node: str, st: dict[str, Any]) -> list[str]:
    """A node in the text of ``pysteer status``."""
    if not st["up"]:
        return [f"  node {node}: DOWN ({st['error']})"]
    state = "accepting" if st["accepting"] else "cordoned"
    if st.get("drained_to"):
        state = f"drained to {st['drained_to']}"
    lines = [
        f"  node {node}: up, pysteer {st.get('version', '?')}, pid {st['pid']}, "
        f"{st['connections']} connection(s), {state}, control {st['control']}"
    ]
    if st.get("workers"):
        shown = []
        for w in st["workers"]:
            restarts = f", restarted {w['restarts']}x" if w["restarts"] else ""
            shown.append(
                f"{w['worker']} (pid {w['pid']}, {w['connections']} connection(s){restarts})"
            )
        lines.append(f"    workers: {', '.join(shown)}")
    if st.get("in_doubt"):
        lines.append(
            f"    IN-DOUBT migration(s): {', '.join(m[:12] for m in st['in_doubt'])} "
            "(see `pysteer migrations`)"
        )
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    nodes: dict[str, Any] = {}
    nobody = {"reachable": False, "error": "no agent is up to ask"}
    steers: dict[str, dict[str, Any]] = {s.name: dict(nobody) for s in cfg.steers}
    for node in sorted(cfg.nodes):
        try:
            st = _ask(cfg, node, "status")["status"]
        except (AgentDown, AgentRefused) as exc:
            nodes[node] = {"up": False, "error": str(exc)}
            continue
        nodes[node] = {"up": True} | st
        seen = st.get("steers") or {cfg.steer.name: st["steer"]}  # an older agent: one
        for name, one in seen.items():
            if name in steers and (one["reachable"] or not steers[name]["reachable"]):
                steers[name] = one | {"via": node}
    several = len(steers) > 1
    down = [
        one | ({"name": n} if several else {}) for n, one in steers.items() if not one["reachable"]
    ]
    steer = down[0] if down else steers[cfg.steer.name]
    certs = {"ca": _expiry(cfg.ca)} | {s.name: _expiry(s.cert) for s in cfg.steers}
    certs |= {n: _expiry(c.cert) for n, c in cfg.nodes.items()}
    certs |= {f"service {p}": _expiry(s.cert) for p, s in cfg.services.items() if s.cert}
    problems = _problems(nodes, steer, certs)
    problems += [
        {"kind": "down", "what": f"steering node {n['name']} is unreachable ({n['error']})"}
        for n in down[1:]
    ]
    result = {
        "cluster": cfg.name,
        "nodes": nodes,
        "steer": steer,
        "steers": steers,
        "certificates": certs,
        "problems": problems,
    }
    code = exitcodes.DOWN if any(p["kind"] == "down" for p in problems) else int(bool(problems))
    if args.json:
        print(json.dumps(result, indent=2))
        return code
    print(f"cluster {cfg.name} ({cfg.path})")
    for node, st in nodes.items():
        print("\n".join(_node_lines(node, st)))
    for spec in cfg.steers:
        print("\n".join(_steer_lines(spec.name, spec.control, steers[spec.name])))
    for name, c in certs.items():
        print(f"  certificate {name}: {_shown_expiry(c)}")
    for p in problems:
        print(f"PROBLEM: {p['what']}")
    return code


def _steer_lines(name: str, control: tuple[str, int], steer: dict[str, Any]) -> list[str]:
    where = f"{control[0]}:{control[1]}"
    if not steer["reachable"]:
        return [f"  steering {name} at {where}: UNREACHABLE ({steer['error']})"]
    stats = steer.get("stats") or {}
    lines = [
        f"  steering {name} at {where}: up (asked via {steer['via']}), "
        f"{stats.get('flows', '?')}/{stats.get('capacity', '?')} flows in the table"
    ]
    if stats.get("table_full") or stats.get("divert_failed"):
        lines.append(
            f"    FLOW TABLE FULL: {stats.get('table_full', 0)} change(s) refused, "
            f"{stats.get('divert_failed', 0)} new connection(s) not diverted; see "
            "`pysteer steer gc` and --max-flows"
        )
    return lines


CERT_WARN_DAYS = 30  # status fails when a certificate expires sooner (rotate it: security.md)


def _problems(
    nodes: dict[str, Any], steer: dict[str, Any], certs: dict[str, Any]
) -> list[dict[str, str]]:
    """What makes ``pysteer status`` fail: 3 if anything is down, else 1."""
    out = [
        {"kind": "down", "what": f"node {n} is down ({st['error']})"}
        for n, st in nodes.items()
        if not st["up"]
    ]
    if not steer["reachable"]:
        who = f"steering node {steer['name']}" if "name" in steer else "the steering daemon"
        out.append({"kind": "down", "what": f"{who} is unreachable ({steer['error']})"})
    out += [
        {"kind": "in-doubt", "what": f"migration {m[:12]} on {n} is in doubt (pysteer migrations)"}
        for n, st in nodes.items()
        for m in st.get("in_doubt", [])
    ]
    out += [
        {"kind": "certificate", "what": f"certificate {name} expires in {c['days_left']} days"}
        for name, c in certs.items()
        if "days_left" in c and c["days_left"] < CERT_WARN_DAYS
    ]
    return out


AGENT = Command(
    "agent",
    help="the per-host agent: run it, or cordon/uncordon a node",
    description="The agent serves the cluster's apps on the VIP and moves their "
    "connections to and from other nodes' agents over mutual TLS.",
    actions=(
        Command(
            "run",
            help="run this node's agent (until SIGTERM)",
            args=(
                CONFIG,
                arg("--node", required=True, help="this node's name in the cluster file"),
                arg(
                    "--metrics",
                    metavar="HOST:PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics",
                ),
                arg("--log-json", action="store_true", help="log one JSON object per line"),
                # Run by the supervisor of a node with workers = N: one of them (0..N-1).
                arg("--worker", type=int, metavar="I", help=argparse.SUPPRESS),
                arg(
                    "--sync-interval",
                    type=float,
                    default=30.0,
                    metavar="SECONDS",
                    help="how often to list every flow served here to the steering node, "
                    "which steers them here and drops stale entries (default: "
                    "%(default)g; also on start and when the steering daemon "
                    "restarts)",
                ),
            ),
            run=cmd_run,
        ),
        *(
            Command(
                name,
                help=help_,
                args=(CONFIG, *NODE, JSON),
                run=cmd_cordon,
                defaults={"what": name},
            )
            for name, help_ in (
                ("cordon", "refuse imports (migrations to the node)"),
                ("uncordon", "accept imports again"),
            )
        ),
    ),
)

MIGRATE = Command(
    "migrate",
    help="move one established connection to another node",
    description="Move FLOW, a client's connection to the VIP, to NODE while the client "
    "notices nothing. Any failure before the commit point rolls back: the flow stays "
    "on its node, nothing lost. FLOW is CLIENT:PORT-VIP:PORT (IPv6 in brackets), as "
    "`pysteer flows` lists it.",
    args=(
        CONFIG,
        arg("--flow", required=True, metavar="FLOW", help="the connection to move"),
        arg("--to", required=True, metavar="NODE", help="the node to move it to"),
        arg(
            "--timeout",
            type=float,
            default=5.0,
            help="seconds before an unfinished move rolls back (default: 5); a proxy "
            "connection first waits up to as long for its request boundary",
        ),
        arg("--json", action="store_true", help="print the report with its timeline"),
    ),
    run=cmd_migrate,
)

DRAIN = Command(
    "drain",
    help="move every connection of a node to another (before a reboot)",
    description="Move every flow of --from to --to, in concurrent batches, with a "
    "progress bar on stderr. New connections to the VIP go to --to from the start, and --from "
    "takes none until `pysteer undrain`. Ctrl-C stops after the batch in flight; every "
    "flow then is on exactly one node, and the summary says which stayed. Run it "
    "again to finish.",
    args=(
        CONFIG,
        arg("--from", dest="source", required=True, metavar="NODE"),
        arg("--to", dest="target", required=True, metavar="NODE"),
        arg("--batch", type=int, default=32, help="migrations at a time (32)"),
        arg(
            "--timeout",
            type=float,
            default=5.0,
            help="per migration (5 s); a proxy connection first waits up to as long for "
            "its request boundary",
        ),
        arg("--dry-run", action="store_true", help="list what would move"),
        arg("--json", action="store_true", help="print the summary as JSON"),
    ),
    run=cmd_drain,
)

MIGRATIONS = Command(
    "migrations",
    help="in-flight and in-doubt migrations; resolve one by hand",
    description="List the migrations each node has in flight (as source or target) and "
    "those in-doubt: the outcome is unknown because neither the steering node nor the "
    "target could be asked. In-doubt migrations are asked again until known; `pysteer "
    "migrations resolve ID --keep source|target` decides one when that cannot happen "
    "(the steering node is gone for good). Keep the flow where you know it is served.",
    args=(CONFIG, arg("--node", help="only this node"), JSON),
    run=cmd_migrations,
    actions=(
        Command(
            "resolve",
            help="decide an in-doubt migration",
            description="Decide migration ID (its id or a prefix, from `pysteer migrations`) on "
            "every node that holds it: --keep source resumes it on its source and discards the "
            "target's copy; --keep target releases the source's frozen socket and serves it on "
            "the target.",
            args=(
                CONFIG,
                arg("id", metavar="ID"),
                arg(
                    "--keep",
                    required=True,
                    choices=("source", "target"),
                    help="which node keeps the connection",
                ),
                JSON,
            ),
            run=cmd_resolve,
        ),
    ),
)

# In the order ``pysteer --help`` lists them.
COMMANDS = (
    AGENT,
    MIGRATE,
    DRAIN,
    Command(
        "undrain",
        help="let a drained node take new connections again",
        args=(CONFIG, *NODE, JSON),
        run=cmd_undrain,
    ),
    Command(
        "flows",
        help="list the connections each node serves",
        args=(CONFIG, arg("--node", help="only this node"), JSON),
        run=cmd_flows,
    ),
    MIGRATIONS,
    Command(
        "status",
        help="nodes, steering daemon and certificate expiry",
        args=(CONFIG, JSON),
        run=cmd_status,
    ),
)
