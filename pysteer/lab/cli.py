"""``pysteer lab up|down|status``: the namespace lab from the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from pysteer.cli import LAB_HELP
from pysteer.clitable import Command, arg
from pysteer.errors import UsageError
from pysteer.lab.plan import DEFAULT_VARIANT, load
from pysteer.lab.topology import DEFAULT_PREFIX, Lab, known_labs
from pysteer.paths import RUN_DIR

PREFIX = arg(
    "--prefix",
    default=DEFAULT_PREFIX,
    help="lab name; namespaces are <prefix>-<node> (default: %(default)s)",
)


def _lab_for(prefix: str, plan_args: argparse.Namespace | None = None) -> Lab:
    """The lab named ``prefix``: with the plan options given, else the plan it was built with."""
    explicit = plan_args is not None and any(
        (plan_args.plan, plan_args.variant, plan_args.v4, plan_args.v6, plan_args.steering)
    )
    if explicit:
        assert plan_args is not None  # noqa: S101
        plan = load(
            plan_args.variant or DEFAULT_VARIANT,
            path=plan_args.plan,
            v4=plan_args.v4,
            v6=plan_args.v6,
            steering=plan_args.steering or 1,
        )
        return Lab(prefix=prefix, plan=plan)
    return Lab.existing(prefix)


def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab_for(args.prefix, args)
    outcome = lab.ensure()
    if args.json:
        print(json.dumps({**lab.status(), "outcome": outcome}, indent=2))
    else:
        print(f"lab {lab.prefix}: {'up' if outcome == 'built' else outcome}")
        _print_summary(lab.status())
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = _lab_for(args.prefix)
    removed = lab.down()
    if args.json:
        print(json.dumps({"lab": lab.prefix, "removed": removed}, indent=2))
    elif removed:
        print(f"lab {lab.prefix}: removed {', '.join(removed)}")
    else:
        print(f"lab {lab.prefix}: nothing to remove")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = load(args.variant, steering=args.steering)
    print(json.dumps(plan.to_dict(), indent=2))
    return 0


def cmd_vm_setup(args: argparse.Namespace) -> int:
    from pysteer.lab.vm import setup_node  # noqa: PLC0415

    done = list(setup_node(load(args.variant, steering=args.steering), args.node))
    if args.json:
        print(json.dumps({"node": args.node, "done": done}, indent=2))
    for line in [] if args.json else done:
        print(f"vm-setup {args.node}: {line}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from pysteer.lab.cluster import agent_argv, steer_argv, write_cluster  # noqa: PLC0415

    if args.variant:
        from pysteer.lab.cluster import write_plan_cluster  # noqa: PLC0415

        plan = load(args.variant)
        if args.dir is None:
            raise UsageError("--variant needs --dir (where the cluster's CA key will stay)")
        # One machine per node: the CLI reaches the others' agents over mutual TLS.
        path = write_plan_cluster(
            plan, args.variant, args.dir.absolute(), force=args.force, remote=True
        )
        if args.json:
            print(json.dumps({"config": str(path), "dir": str(args.dir.absolute())}))
            return 0
        print(
            f"cluster file: {path}; the CA key stays here: give each machine only its "
            f"own files with pysteer certs bundle --dir {args.dir} --node NODE"
        )
        return 0
    lab = _lab_for(args.prefix)
    if lab.status()["state"] != "up":
        raise UsageError(f"lab {args.prefix!r} is not up (pysteer lab up --prefix {args.prefix})")
    directory = (args.dir or RUN_DIR / lab.prefix / "cluster").absolute()
    commands, store = [], []
    etcd = None
    if len(lab.plan.steers) > 1:  # the shared store: one etcd member on the last host
        from pysteer.lab.etcd import Etcd  # noqa: PLC0415

        etcd = Etcd(lab, directory / "etcd", directory, [lab.plan.hosts[-1]])
        store = [f"{h}:{p}" for h, p in etcd.endpoints]
    path = write_cluster(lab, directory, force=args.force, store=store or None)
    if etcd is not None:
        etcd.issue()  # its certificate, from the cluster CA just written
        member = etcd.nodes[0]
        commands.append(shlex.join(["ip", "netns", "exec", lab.netns(member), *etcd.argv(member)]))
    for steer in lab.plan.steers:
        more = [a for e in store for a in ("--store", e)]
        more += ["--store-cluster", lab.prefix] if store else []
        commands.append(shlex.join(["pysteer", *steer_argv(lab, path, steer=steer)[3:], *more]))
    for host in lab.plan.hosts:
        argv = ["ip", "netns", "exec", lab.netns(host), "pysteer", *agent_argv(path, host)[3:]]
        commands.append(shlex.join(argv))
    if args.json:
        out = {"config": str(path), "dir": str(directory.absolute()), "commands": commands}
        print(json.dumps(out, indent=2))
        return 0
    print(f"cluster file: {path}")
    print("start them, in this order (each runs until SIGTERM):")
    for command in commands:
        print(f"  {command} &")
    print(f"then: export PYSTEER_CONFIG={shlex.quote(str(path))}; pysteer status")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab_for(args.prefix)
    status = lab.status()
    if status["state"] == "absent":
        known = known_labs()
        raise UsageError(
            f"no lab named {args.prefix!r}; "
            + (f"labs here: {', '.join(known)}" if known else "no lab is up (pysteer lab up)")
        )
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"lab {lab.prefix}: {status['state']}")
        _print_summary(status)
    return 0 if status["state"] == "up" else 1


def _print_summary(status: dict[str, Any], out: Any = sys.stdout) -> None:
    vip = status["vip"]
    print(f"  VIP {vip['v4']}  {vip['v6']}  (routed to host {status['default_host']})", file=out)
    for node, entry in status["nodes"].items():
        if not entry["exists"]:
            print(f"  {node:<7} {entry['netns']:<18} MISSING", file=out)
            continue
        addrs = [
            f"{ifname}={','.join(info['addresses'])}"
            for ifname, info in entry["interfaces"].items()
            if info["addresses"]
        ]
        procs = f"  [{len(entry['pids'])} processes]" if entry["pids"] else ""
        print(f"  {node:<7} {entry['netns']:<18} {'  '.join(addrs)}{procs}", file=out)


JSON = arg("--json", action="store_true", help="machine-readable output")


LAB = Command(
    "lab",
    help=LAB_HELP,
    description=(
        "The namespace lab: a client, a steering node and two hosts (a, b) as network "
        "namespaces <prefix>-<node> joined by veth pairs. The VIP is on both hosts; the "
        "steering node routes it to host a. Needs root."
    ),
    actions=(
        Command(
            "up",
            help="build the lab (a no-op if it is up; repairs a half-built one)",
            args=(
                PREFIX,
                arg(
                    "--plan", type=Path, help="address plan file (JSON, like pysteer/lab/plan.json)"
                ),
                arg("--variant", help=f"plan variant (default: {DEFAULT_VARIANT})"),
                arg("--v4", metavar="CIDR", help="private IPv4 /16 to use instead of the plan's"),
                arg("--v6", metavar="CIDR", help="IPv6 ULA /48 to use instead of the plan's"),
                arg(
                    "--steering",
                    type=int,
                    metavar="N",
                    help="steering nodes (default 1): with 2 or more, each has a link to the "
                    "client and to every host, and the client reaches the VIP through all "
                    "of them by an ECMP route hashed on L4 (as a router would)",
                ),
                arg("--json", action="store_true", help="print the resulting status as JSON"),
            ),
            run=cmd_up,
        ),
        Command(
            "down",
            help="remove every namespace, link and process of the lab",
            args=(PREFIX, JSON),
            run=cmd_down,
        ),
        Command(
            "cluster",
            help="write a pysteer cluster for the lab (certificates, key, cluster.toml)",
            description="Write the control-plane CA, the node certificates, the cluster key, a "
            "service certificate under a service CA of its own (service-ca.pem: what clients "
            "trust) and cluster.toml for the lab's addresses into DIR, then print the commands "
            "that start the steering daemon and the two agents (with --steering N: a one-member "
            "etcd, the shared store, and N steering daemons). DIR is created 0700; an existing "
            "one must be root's and not writable by others.",
            args=(
                PREFIX,
                arg(
                    "--dir",
                    type=Path,
                    help="where to write the files (default for a lab: "
                    "/run/pysteer/PREFIX/cluster, removed by lab down; needed "
                    "with --variant)",
                ),
                arg("--force", action="store_true", help="replace an existing cluster"),
                arg(
                    "--variant",
                    help="for machines laid out by this plan variant (vm) "
                    "instead of a lab; the cluster is named after it",
                ),
                JSON,
            ),
            run=cmd_cluster,
        ),
        Command(
            "plan",
            help="print a plan variant's derived addresses (JSON)",
            args=(
                arg("--variant", default=DEFAULT_VARIANT, help="plan variant (lab, vm)"),
                arg("--steering", type=int, default=1, metavar="N", help="steering nodes (1)"),
                arg("--json", action="store_true", help="accepted: the plan is always JSON"),
            ),
            run=cmd_plan,
        ),
        Command(
            "vm-setup",
            help="set this machine up as one node of the plan (the Vagrant demo's VMs)",
            description="On a VM whose link IPv4 addresses Vagrant assigned from the plan's vm "
            "variant: add the IPv6 addresses, the role's sysctls, the VIP on a host's lo and "
            "routes through the steering node. Safe to run again.",
            args=(
                arg("--node", required=True, help="this machine's node name in the plan"),
                arg("--variant", default="vm", help="plan variant (default: vm)"),
                arg(
                    "--steering",
                    type=int,
                    default=1,
                    metavar="N",
                    help="steering nodes in the plan (default 1): every machine of it must "
                    "be set up with the same N",
                ),
                JSON,
            ),
            run=cmd_vm_setup,
        ),
        Command(
            "status",
            help="show what exists of the lab",
            args=(PREFIX, JSON),
            run=cmd_status,
        ),
    ),
)
