#!/usr/bin/env python3
"""Benchmark pysteer's TLS proxy in front of nginx, against nginx alone, in one run.

On lab host a, one nginx (one worker) serves the same static file three ways, all
reached by wrk from the client namespace through the steering node:

- ``direct``: nginx itself, plain HTTP on the VIP (the backend alone);
- ``nginx-tls``: nginx terminating TLS on the VIP as a reverse proxy to itself on
  127.0.0.1 (keep-alive upstream): what an operator runs without pysteer;
- ``pysteer``: pysteer's agent terminating TLS on the VIP (``app = "proxy"``) and
  relaying to the same nginx on 127.0.0.1.

Then ``pysteer-drain``, once per round: the pysteer case again, with ``pysteer drain --from a
--to b`` in
the middle of the run (b has its own nginx), to show what a drain does to the latency.

Reported per case (JSON and stdout): requests/s, latency p50/p90/p99 (wrk --latency),
socket errors and non-2xx; the ratios pysteer/direct and pysteer/nginx-tls; the drain's
p99 against the same case without a drain.

Run as root: scripts/bench/proxy.py [--connections 50] [--seconds 8] [--path /1k.bin]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pysteer.lab import Lab
from pysteer.lab.backends import Nginx
from pysteer.lab.clients import netstat
from pysteer.lab.cluster import LabCluster
from pysteer.lab.pytest_plugin import unique_prefix

PROXY, NGINX_TLS, DIRECT, BACKEND = 443, 8443, 8080, 8080


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's summary: requests/s, latency percentiles in ms, errors."""

    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", text, re.M))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rps is None or not lat:
        raise RuntimeError(f"wrk said:\n{text}")
    return {
        "requests_per_s": float(rps[1]),
        "p50_ms": ms(lat["50"]),
        "p90_ms": ms(lat["90"]),
        "p99_ms": ms(lat["99"]),
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "non_2xx": int(non2xx[1]) if non2xx else 0,
    }


def client_counters(lab: Lab, node: str = "client") -> dict[str, int]:
    """A namespace's retransmission counters (a lost packet shows on its sender)."""
    tcp, ext = lab.call(node, netstat, "Tcp"), lab.call(node, netstat, "TcpExt")
    return {
        "RetransSegs": tcp["RetransSegs"],
        "TCPTimeouts": ext["TCPTimeouts"],
        "TCPLossProbes": ext["TCPLossProbes"],  # tail loss probes: spurious when slow
        "TCPSpuriousRTOs": ext["TCPSpuriousRTOs"],
    }


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def wrk(lab: Lab, url: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    argv = ["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s", "--latency", url]
    return lab.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def nginx_tls_server(cluster_dir: Path, vip: str, www: Path) -> str:
    """nginx's own TLS front and plain listener on the VIP (host a only)."""
    return f"""
    upstream self_backend {{ server 127.0.0.1:{BACKEND}; keepalive 64; }}
    server {{
        listen {vip}:{NGINX_TLS} ssl;
        ssl_certificate {cluster_dir}/service.pem;
        ssl_certificate_key {cluster_dir}/service.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        access_log off;
        location / {{
            proxy_pass http://self_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    server {{
        listen {vip}:{DIRECT};
        access_log off;
        root {www};
    }}
"""


def run_cli(cluster: LabCluster, *args: str) -> dict[str, Any]:
    """``pysteer ARGS`` against the lab's cluster: its JSON answer, or its error."""
    out = subprocess.run(
        [sys.executable, "-m", "pysteer", *args],
        env={"PYSTEER_CONFIG": str(cluster.config), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        return json.loads(out.stdout) if out.stdout.strip() else {"error": out.stderr.strip()}
    except json.JSONDecodeError:
        return {"output": out.stdout.strip()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(prefix=unique_prefix()).up()
    work = Path(tempfile.mkdtemp(prefix="pysteer-bench-proxy-"))
    services = {PROXY: ("proxy", True, {"backend": f"127.0.0.1:{BACKEND}"})}
    cluster = LabCluster(lab, work / "cluster", services=services)
    vip = str(lab.plan.vip(4))
    nginx = Nginx(lab, work / "nginx", port=BACKEND)
    nginx.extra_servers = {"a": nginx_tls_server(cluster.dir, vip, nginx.www)}
    results: dict[str, Any] = {}
    try:
        cluster.start()  # the agents first: they put the VIP on the hosts
        nginx.start_all()
        urls = {
            "direct": f"http://{vip}:{DIRECT}{args.path}",
            "nginx-tls": f"https://{vip}:{NGINX_TLS}{args.path}",
            "pysteer": f"https://{vip}:{PROXY}{args.path}",
        }
        for rnd in range(args.rounds):  # alternate, so drift hits every case alike
            for name, url in urls.items():
                before = client_counters(lab)
                out, _ = wrk(lab, url, args).communicate(timeout=args.seconds + 60)
                run = parse_wrk(out) | {"client": delta(before, client_counters(lab))}
                results.setdefault(name, []).append(run)
                print(f"round {rnd + 1} {name}: {results[name][-1]}", flush=True)
        results["pysteer-drain"], results["drain"] = [], []
        for rnd in range(args.rounds):  # each round: wrk on a, a drained to b mid-way
            if rnd:
                run_cli(cluster, "undrain", "--node", "a")
            before = client_counters(lab)
            hosts = {h: client_counters(lab, h) for h in ("a", "b")}
            proc = wrk(lab, urls["pysteer"], args)
            time.sleep(args.seconds / 2)
            drain: dict[str, Any] = {}
            thread = threading.Thread(
                target=lambda d=drain: d.update(
                    run_cli(cluster, "drain", "--from", "a", "--to", "b", "--json")
                )
            )
            thread.start()
            out, _ = proc.communicate(timeout=args.seconds + 60)
            thread.join(120)
            run = parse_wrk(out) | {"client": delta(before, client_counters(lab))}
            run["hosts"] = {h: delta(c, client_counters(lab, h)) for h, c in hosts.items()}
            results["pysteer-drain"].append(run)
            keys = ("moved", "failed", "rolled_back", "seconds", "freeze_ms", "steps_ms", "error")
            results["drain"].append({k: drain.get(k) for k in keys if k in drain})
            print(f"round {rnd + 1} pysteer-drain: {run}", flush=True)
    finally:
        cluster.close()
        nginx.close()
        lab.down()
    return summarize(results, args)


def summarize(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    def best(name: str) -> dict[str, Any]:  # the median run by requests/s
        runs = sorted(results[name], key=lambda r: r["requests_per_s"])
        return runs[len(runs) // 2]

    cases = {n: best(n) for n in ("direct", "nginx-tls", "pysteer", "pysteer-drain")}
    ratio = {
        "pysteer_vs_direct_rps": round(
            cases["pysteer"]["requests_per_s"] / cases["direct"]["requests_per_s"], 3
        ),
        "pysteer_vs_nginx_tls_rps": round(
            cases["pysteer"]["requests_per_s"] / cases["nginx-tls"]["requests_per_s"], 3
        ),
        "pysteer_vs_nginx_tls_p99": round(
            cases["pysteer"]["p99_ms"] / cases["nginx-tls"]["p99_ms"], 3
        ),
        "drain_p99_vs_no_drain_p99": round(
            cases["pysteer-drain"]["p99_ms"] / cases["pysteer"]["p99_ms"], 3
        ),
    }
    drain_p99 = sorted(r["p99_ms"] for r in results["pysteer-drain"])
    return {
        "config": {k: str(v) for k, v in vars(args).items()},
        "cases": cases,
        "runs": {k: v for k, v in results.items() if k != "drain"},
        "drain": results["drain"],
        "drain_p99_ms_each_round": drain_p99,
        "ratios": ratio,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--path", default="/1k.bin", help="1k.bin, 64k.bin, 1m.bin (default 1k)")
    p.add_argument("--out", type=Path, default=Path("results/bench/proxy.json"))
    args = p.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, case in result["cases"].items():
        print(
            f"{name:14} {case['requests_per_s']:9.0f} req/s  p50 {case['p50_ms']:7.2f}  "
            f"p90 {case['p90_ms']:7.2f}  p99 {case['p99_ms']:7.2f} ms  "
            f"errors {case['socket_errors']}  non-2xx {case['non_2xx']}  "
            f"client retransmissions {case['client']['RetransSegs']}"
        )
    print(f"ratios: {result['ratios']}")
    for d in result["drain"]:
        f = d.get("freeze_ms") or {}
        print(
            f"drain: {d.get('moved')} moved, {d.get('failed')} failed in {d.get('seconds')} s, "
            f"freeze p50 {f.get('p50')} p99 {f.get('p99')} ms {d.get('error') or ''}"
        )
    print(f"client p99 during each drain run: {result['drain_p99_ms_each_round']} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
