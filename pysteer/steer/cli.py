"""``pysteer steer ...``: run the steering daemon, or talk to it."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import math
import os
from pathlib import Path
from typing import Any

from pysteer.clitable import Command, LazyChoices, arg, given, one_of, print_table
from pysteer.cluster.config import ENV, load_config
from pysteer.errors import UsageError
from pysteer.flow import Flow
from pysteer.steer.control import request, socket_path


def _modes() -> tuple[str, ...]:
    from pysteer.steer.loader import MODES  # noqa: PLC0415 - the loader imports pyroute2

    return MODES


# Which steering instance: --name, else the cluster file's name ([cluster] name, as the
# lab and `pysteer-steer@NAME` name it), else "default".
NAME = arg(
    "--name",
    help="daemon instance (default: the cluster's name, from --config or $PYSTEER_CONFIG; "
    "else 'default')",
)
CONFIG = arg("--config", type=Path, help="the cluster file (default: $PYSTEER_CONFIG)")
ASKING = (
    NAME,
    CONFIG,
    arg("--socket", type=Path, help="control socket (default: from --name)"),
    arg("--json", action="store_true", help="machine-readable output"),
)
# One vocabulary (docs/cli.md): --flow FLOW, --to NODE, --node NODE. The positional forms
# are the old spellings, kept as deprecated aliases.
FLOW = (
    arg("--flow", metavar="FLOW", help="the flow, SRC:PORT-DST:PORT"),
    arg("old_flow", metavar="FLOW", nargs="?", help="(deprecated: use --flow)"),
)
TO = (
    arg("--to", metavar="NODE", help="the node (a --host of the daemon)"),
    arg("old_to", metavar="HOST", nargs="?", help="(deprecated: use --to)"),
)


def instance(args: argparse.Namespace) -> str:
    """The steering instance a command means (see NAME)."""
    if args.name:
        return str(args.name)
    path = getattr(args, "config", None) or os.environ.get(ENV)
    return load_config(path).name if path else "default"


def _ask(args: argparse.Namespace, cmd: str, **extra: Any) -> dict[str, Any]:
    return request(args.socket or socket_path(instance(args)), cmd, **extra)


def _hosts(specs: list[str]) -> list[tuple[str, str, str]]:
    """``--host`` options as (name, interface or address, MAC or "")."""
    hosts = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        ifname, _, mac = rest.partition(",")
        if not mac:
            try:
                ipaddress.ip_address(ifname)
            except ValueError:
                raise UsageError(
                    f"--host {spec!r}: expected NAME=IFNAME,MAC or NAME=ADDRESS"
                ) from None
        if not name or not ifname:
            raise UsageError(f"--host {spec!r}: expected NAME=IFNAME,MAC or NAME=ADDRESS")
        hosts.append((name, ifname, mac))
    return hosts


def _store_args(args: argparse.Namespace) -> tuple[list[str], float] | None:
    """The store reader's argv and how long to wait for it (None: no --store)."""
    if not args.store:
        return None
    if not (args.tls_cert and args.tls_key and args.tls_ca):
        raise UsageError("--store needs --tls-cert, --tls-key and --tls-ca (mutual TLS)")
    if not args.store_cluster:
        raise UsageError("--store needs --store-cluster (the cluster file's cluster.name)")
    for e in args.store:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--store {e!r}: expected HOST:PORT")
    if not (math.isfinite(args.store_wait) and 0 < args.store_wait <= 3600):
        raise UsageError("--store-wait must be in (0, 3600] seconds")
    from pysteer.steer.store_feed import feed_argv  # noqa: PLC0415

    argv = feed_argv(
        args.netns,
        args.store,
        args.store_cluster,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        timeout=2.0,
    )
    return argv, args.store_wait


def cmd_run(args: argparse.Namespace) -> int:
    from pysteer.harden import harden  # noqa: PLC0415
    from pysteer.identity import server_context  # noqa: PLC0415 - needs cryptography
    from pysteer.steer.daemon import run  # noqa: PLC0415 - needs BCC

    harden()  # before the TLS key is read: no core dump holds it
    from pysteer.steer.pins import PinError, check_name  # noqa: PLC0415

    args.name = instance(args)
    try:
        check_name(args.name)  # a bad name is refused before anything is probed or loaded
    except PinError as exc:
        raise UsageError(str(exc)) from None
    hosts = _hosts(args.host)
    if not (math.isfinite(args.idle_timeout) and 0 < args.idle_timeout <= 7 * 86400):
        raise UsageError("--idle-timeout must be in (0, 604800] seconds")
    if not (math.isfinite(args.gc_interval) and 0.05 <= args.gc_interval <= 3600):
        raise UsageError("--gc-interval must be in [0.05, 3600] seconds")
    if args.max_flows is not None and not 1 <= args.max_flows <= 1 << 24:
        raise UsageError(f"--max-flows must be 1..{1 << 24}")
    listen = tls = reload_tls = None
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--listen {args.listen!r}: expected HOST:PORT")
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            raise UsageError("--listen needs --tls-cert, --tls-key and --tls-ca (mutual TLS)")
        listen = (host.strip("[]"), int(port))
        reload_tls = functools.partial(server_context, args.tls_cert, args.tls_key, args.tls_ca)
        tls = reload_tls()
    metrics = None
    if args.metrics:
        from pysteer.metrics import parse_listen  # noqa: PLC0415

        try:
            metrics = parse_listen(args.metrics)
        except ValueError as exc:
            raise UsageError(f"--metrics: {exc}") from None
    store = _store_args(args)
    return run(
        args.name,
        args.ifname,
        hosts,
        namespace=args.netns,
        mode=args.mode,
        max_flows=args.max_flows,
        max_parked=args.max_parked,
        listen=listen,
        tls=tls,
        metrics=metrics,
        log_json=args.log_json,
        idle_timeout=args.idle_timeout,
        gc_interval=args.gc_interval,
        reload_tls=reload_tls,
        certificates={"node": args.tls_cert, "ca": args.tls_ca} if listen else None,
        store=store,
    )


def cmd_show(args: argparse.Namespace) -> int:
    answer = _ask(args, args.what)
    if args.json:  # one object, the list or map under its name, as every --json
        print(json.dumps({args.what: answer[args.what]}, indent=2))
    elif args.what == "flows":
        rows = [("FLOW", "ACTION", "HOST", "PACKETS", "PARKED")]
        for row in answer["flows"]:
            total = sum(row["packets"].values())
            park = row["packets"]["park"]
            rows.append((row["flow"], row["action"], row["host"] or "-", str(total), str(park)))
        print_table(rows)
    elif args.what == "hosts":
        rows = [("HOST", "ID", "LINK", "MAC")]
        rows += [(r["name"], str(r["id"]), r["ifname"], r["mac"]) for r in answer["hosts"]]
        print_table(rows)
    elif args.what == "diversions":
        rows = [("ADDRESS", "HOST")]
        rows += [(address, str(host)) for address, host in answer["diversions"].items()]
        print_table(rows)
    else:
        stats = answer["stats"]
        for key, value in stats.items():
            print(f"{key:<18} {value}")
        if stats.get("table_full") or stats.get("divert_failed"):
            print(
                f"WARNING: the flow table ({stats.get('capacity')} entries) was full: "
                f"{stats.get('table_full', 0)} change(s) refused, "
                f"{stats.get('divert_failed', 0)} new connection(s) not diverted"
            )
        if stats.get("redirect_failed"):
            print(
                f"WARNING: {stats['redirect_failed']} redirected packet(s) were lost by a "
                "host link's driver (see the daemon's log, and docs/tuning.md)"
            )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    answer = _ask(args, "gc", dry_run=args.dry_run)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for r in answer["removed"]:
        where = f" -> {r['host']}" if r["host"] else ""
        print(f"{r['flow']:<48} {r['action']}{where} ({r['reason']})")
    print(f"{verb} {len(answer['removed'])} entr{'y' if len(answer['removed']) == 1 else 'ies'}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    import fcntl  # noqa: PLC0415

    from pysteer.steer import pins  # noqa: PLC0415
    from pysteer.steer.daemon import lock_path  # noqa: PLC0415

    args.name = instance(args)
    pins.check_name(args.name)  # makes nothing: a destroy must not create what it removes
    path = lock_path(args.name)
    if path.exists():
        with open(path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(
                    f"a steering daemon runs instance {args.name!r}: stop it first"
                ) from None
    if args.ifname:
        from pysteer.netns import call_in  # noqa: PLC0415
        from pysteer.steer.loader import detach, detach_pass_hosts  # noqa: PLC0415

        pin = pins.PIN_ROOT / args.name  # the hosts' links lose pysteer_pass (native XDP)
        if args.netns:
            call_in(args.netns, detach, args.ifname, "xdp-native")
            call_in(args.netns, detach, args.ifname, "xdp-generic")
            call_in(args.netns, detach_pass_hosts, pin)
        else:
            detach(args.ifname, "xdp-native")
            detach(args.ifname, "xdp-generic")
            detach_pass_hosts(pin)
    pins.remove(args.name)
    path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps({"destroyed": args.name, "detached_from": args.ifname}))
    else:
        print(f"steering instance {args.name!r}: pinned maps removed")
    return 0


def cmd_divert(args: argparse.Namespace) -> int:
    try:
        address = str(ipaddress.ip_address(args.address))
    except ValueError:
        raise UsageError(f"not an IP address: {args.address!r}") from None
    to = given(args.to, args.old_to, "--to")
    if args.clear and to:
        raise UsageError("give --to NODE or --clear, not both")
    if not args.clear and not to:
        raise UsageError(
            "give --to NODE (where new connections go), or --clear to end the diversion"
        )
    answer = _ask(args, "divert", address=address, host=None if args.clear else to)
    if args.json:
        print(json.dumps({"diversions": answer["diversions"]}))
    else:
        print(f"new connections to {address}: {'routed' if args.clear else f'to {to}'}")
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    flow = str(Flow.parse(one_of(args.flow, args.old_flow, "--flow FLOW")))
    to = one_of(args.to, args.old_to, "--to NODE") if args.what == "to" else None
    extra = {"flow": flow} | ({"host": to} if to is not None else {})
    answer = _ask(args, args.what, **extra)
    if args.json:
        print(json.dumps(answer))
    elif args.what == "to":
        print(f"{flow} -> {to} ({answer['replayed']} parked packets replayed)")
    elif args.what == "forget":
        print(f"{flow}: forgotten (its packets are routed normally)")
    else:
        print(f"{flow}: {args.what}")
    return 0


RUN_ARGS = (
    NAME,
    CONFIG,
    arg("--ifname", required=True, help="the client-facing interface"),
    arg("--netns", help="network namespace of the interfaces"),
    arg(
        "--mode",
        default="auto",
        help="auto: tc on veth; elsewhere native XDP if the driver runs "
        "it and a self-test shows redirected frames leave every "
        "host's link, tc otherwise (the reason is logged)",
        choices=LazyChoices(_modes),
    ),
    arg(
        "--host",
        action="append",
        default=[],
        metavar="NAME=IFNAME,MAC",
        help="a redirect target, or NAME=ADDRESS (its link address: the link "
        "and MAC are looked up); repeat for each host",
    ),
    arg(
        "--max-flows",
        type=int,
        help="flow table size (default 65536; a pinned table keeps its size, "
        "and a different value is refused)",
    ),
    arg(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="remove an entry whose flow has been idle this long and that no "
        "agent claims (default: %(default)g)",
    ),
    arg(
        "--gc-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often expired entries and leases are collected (default: %(default)g)",
    ),
    arg("--max-parked", type=int, default=8192, help="parked packets per flow"),
    arg(
        "--listen",
        metavar="HOST:PORT",
        help="also serve remote agents on TCP (mutual TLS; needs the three below)",
    ),
    arg("--tls-cert", type=Path, help="this node's certificate (PEM)"),
    arg("--tls-key", type=Path, help="its private key (PEM)"),
    arg("--tls-ca", type=Path, help="the CA that signs the agents' certificates"),
    arg(
        "--store",
        action="append",
        metavar="HOST:PORT",
        help="an etcd member of the shared store (repeat for each): its overrides are "
        "loaded before the programs attach and mirrored into the table after; uses "
        "--tls-cert, --tls-key and --tls-ca, from inside --netns",
    ),
    arg(
        "--store-cluster",
        metavar="NAME",
        help="the cluster's name in the store (its cluster file's cluster.name)",
    ),
    arg(
        "--store-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the store's overrides before giving up without "
        "attaching (default: %(default)g)",
    ),
    arg(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics (in the namespace of --netns)",
    ),
    arg("--log-json", action="store_true", help="log one JSON object per line"),
)

STEER = Command(
    "steer",
    help="the steering node: run its daemon, or inspect and change its flow table",
    description=(
        "The steering node redirects a migrating flow's packets to the new host, parks "
        "them while the flow is frozen and replays them afterwards. FLOW is written "
        "SRC:PORT-DST:PORT (IPv6 in brackets)."
    ),
    actions=(
        Command("run", help="run the steering daemon (until SIGTERM)", args=RUN_ARGS, run=cmd_run),
        *(
            Command(name, help=help_, args=ASKING, run=cmd_show, defaults={"what": name})
            for name, help_ in (
                ("flows", "list the flow table"),
                ("hosts", "list the hosts"),
                ("stats", "global counters"),
                ("diversions", "VIPs whose new connections go to one host"),
            )
        ),
        *(
            Command(
                name, help=help_, args=(*ASKING, *extra), run=cmd_change, defaults={"what": name}
            )
            for name, help_, extra in (
                ("park", "hold FLOW's packets", FLOW),
                ("pass", "route FLOW normally", FLOW),
                ("to", "replay FLOW's parked packets to NODE, then redirect", (*FLOW, *TO)),
                ("forget", "remove FLOW's entry (its packets are routed normally)", FLOW),
            )
        ),
        Command(
            "gc",
            help="remove entries whose connections ended (idle, unclaimed), now",
            description="Collect the flow table now, as the daemon does every --gc-interval: "
            "entries idle longer than the idle timeout that no agent claims, and parks whose "
            "migration's lease ran out (rolled back). --dry-run lists them and changes nothing.",
            args=(*ASKING, arg("--dry-run", action="store_true", help="list, do not remove")),
            run=cmd_gc,
        ),
        Command(
            "destroy",
            help="remove an instance's pinned maps and programs (drops every steered flow)",
            description="For a steering node being retired, or maps of another pysteer version: "
            "detach nothing that a running daemon owns (it refuses while one runs), remove the "
            "pinned maps under /sys/fs/bpf/pysteer/NAME. Steered flows go back to normal routing.",
            args=(
                NAME,
                CONFIG,
                arg("--ifname", help="also detach pysteer's programs from this interface"),
                arg("--netns", help="network namespace of --ifname"),
                arg("--json", action="store_true", help="machine-readable output"),
            ),
            run=cmd_destroy,
        ),
        Command(
            "divert",
            help="send new connections to ADDRESS to NODE (a drain)",
            args=(
                *ASKING,
                arg("address", metavar="ADDRESS", help="a service address (VIP)"),
                *TO,
                arg("--clear", action="store_true", help="route new connections normally again"),
            ),
            run=cmd_divert,
        ),
    ),
)
