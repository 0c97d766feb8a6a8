"""The demo (``scripts/demo``): live TLS and TCP connections moved between lab hosts.

It builds the lab, starts the steering daemon and both agents, connects unmodified clients
from the client namespace (``openssl s_client`` on the TLS ticker, a plain TCP line client,
a rate-limited curl download over TLS, and a curl keep-alive loop of requests to an
unmodified nginx that pysteer fronts on each host, ``app = "proxy"``), moves the s_client
flow back and forth with ``pysteer migrate``, drains host a to b with ``pysteer drain``,
then checks what every client saw and prints a report. Exit status 0 only if no client
noticed anything: every byte and line exact, no RST sent to a client, no retransmission
timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pysteer.app.handlers import http_body
from pysteer.lab.backends import Nginx, file_sha256
from pysteer.lab.clients import LineClient, RstCapture, Session, StreamError, netstat
from pysteer.lab.cluster import DEFAULT_SERVICES, LabCluster
from pysteer.lab.plan import load
from pysteer.lab.topology import Lab, LabError

PYSTEER = [sys.executable, "-m", "pysteer"]
DOWNLOAD = 24_000_000  # bytes, at 3 MB/s: it spans the migrations and the drain
PROXY_PORT = 8000  # the VIP port where pysteer fronts each host's nginx
NGINX_PORT = 8080  # nginx on 127.0.0.1 of each host
LOOP = ["1k.bin", "64k.bin"] * 40  # the curl keep-alive loop, 10 requests a second


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def counters(lab: Lab) -> dict[str, int]:
    tcp, ext = lab.call("client", netstat, "Tcp"), lab.call("client", netstat, "TcpExt")
    return {
        "retrans": tcp["RetransSegs"],
        "timeouts": ext["TCPTimeouts"],
        "resets": tcp["EstabResets"],
    }


class Demo:
    def __init__(self, prefix: str, moves: int, keep: bool = False) -> None:
        self.prefix, self.moves, self.keep = prefix, moves, keep
        self.dir = Path(tempfile.mkdtemp(prefix="pysteer-demo-"))
        self.problems: list[str] = []
        self.lines: list[str] = []

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PYSTEER, *args, "--config", str(self.cluster.config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def flows(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("flows", "--json").stdout)["flows"]

    def run(self) -> int:
        with contextlib.suppress(LabError):
            Lab.existing(self.prefix).down()  # what an interrupted demo left
        self.lab = Lab(prefix=self.prefix, plan=load())
        say(f"building the lab {self.prefix!r}: client, steering node, hosts a and b")
        self.lab.up()
        services = dict(DEFAULT_SERVICES)
        services[PROXY_PORT] = ("proxy", True, {"backend": f"127.0.0.1:{NGINX_PORT}"})
        self.cluster = LabCluster(self.lab, self.dir, services=services)
        self.nginx = Nginx(self.lab, self.dir / "nginx", port=NGINX_PORT)
        try:
            say(
                "starting the steering daemon and the agents (TLS ticker on :443, "
                f"HTTP on :8443, plain ticker on :7000, nginx behind pysteer on :{PROXY_PORT})"
            )
            self.cluster.start()
            say(f"starting nginx on 127.0.0.1:{NGINX_PORT} of each host (unmodified, Debian's)")
            self.nginx.start_all()
            self._scenario()
        finally:
            say("cleaning up")
            self.cluster.close()
            self.nginx.close()
            self.lab.down()
        self._report()
        if self.keep or self.problems:  # the daemons' logs say what went wrong
            say(f"the cluster's files (logs, certificates and keys) are in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)  # a lab's keys do not outlive it
        return 1 if self.problems else 0

    def _scenario(self) -> None:
        lab, vip = self.lab, str(self.lab.plan.vip(4))
        ca = str(self.cluster.client_ca)
        before = counters(lab)
        client_if = lab.plan.link(lab.plan.client).peer_end.name
        with RstCapture(lab, "client", client_if) as capture:
            s_client = Session(
                lab,
                [
                    "openssl",
                    "s_client",
                    "-connect",
                    f"{vip}:443",
                    "-servername",
                    "vip",
                    "-verify_hostname",
                    "vip",
                    "-CAfile",
                    ca,
                    "-verify_return_error",
                    "-quiet",
                ],
                interval=0.01,
            )
            s_client.wait_for("ticker ready")
            plain = LineClient(
                lab.call("client", socket.create_connection, (vip, 7000)), interval=0.01
            )
            plain.start()
            body = self.dir / "download"
            curl_argv = [
                "curl",
                "--silent",
                "--show-error",
                "--fail",
                "--http1.1",
                "--limit-rate",
                "3M",
                "--cacert",
                ca,
                "--resolve",
                f"vip:8443:{vip}",
                "-o",
                str(body),
                f"https://vip:8443/bytes/{DOWNLOAD}",
            ]
            curl = lab.popen("client", curl_argv, stderr=subprocess.PIPE, text=True)
            loop = self._curl_loop(ca, vip)
            s_client.start_writing()
            time.sleep(1.0)
            quiet = (time.monotonic() - 0.8, time.monotonic())
            baseline = {
                "s_client": s_client.largest_gap(*quiet),
                "plain": plain.largest_gap(*quiet),
            }
            flows = {f["flow"]: f for f in self.flows()}
            s_flow = next(f for f in flows if f.endswith(":443"))
            say(
                f"{len(flows)} client connections on host a: s_client, plain TCP, a curl "
                "download, a curl keep-alive loop to nginx"
            )
            start = time.monotonic()
            self._move_and_drain(s_flow)
            time.sleep(0.5)
            end = time.monotonic()
            self.gaps = {
                "s_client": s_client.largest_gap(start, end),
                "plain": plain.largest_gap(start, end),
            }
            self.baseline = baseline
            self.on_b = sorted(f["node"] for f in self.flows())
            s_client.stop_writing()
            s_client.drain()
            code = curl.wait(120)
            err = curl.stderr.read()
            curl.stderr.close()
            self.loop_out, self.loop_err = loop.communicate(timeout=120)
            self.loop_code = loop.returncode
            self.plain_text = plain.finish()
            self.plain_sent = plain.sent
        self.s_text, self.s_sent = s_client.finish(), s_client.sent
        after = counters(lab)
        self.counts = {k: after[k] - before[k] for k in after}
        plain.close()  # after the capture: its kernel may RST a tick that crosses the close
        # RSTs towards a client would be noticed; a client's own RST at its close (curl's,
        # answering the server's close_notify that crossed its close) is not.
        vip = f"{self.lab.plan.vip(4)}."
        self.rsts = [ln for ln in capture.lines if ln.split(" > ")[0].split()[-1].startswith(vip)]
        self.own_rsts = [ln for ln in capture.lines if ln not in self.rsts]
        self._check_clients(body, code, err)

    def _curl_loop(self, ca: str, vip: str) -> subprocess.Popen[str]:
        """curl asking nginx (behind pysteer) for one file after another, 10 a second, on
        one keep-alive connection: each body to its own file, a line per transfer."""
        argv = ["curl", "--silent", "--show-error", "--http1.1", "--rate", "10/s"]
        argv += ["--cacert", ca, "--resolve", f"vip:{PROXY_PORT}:{vip}"]
        (self.dir / "loop").mkdir()
        for i, name in enumerate(LOOP):
            argv += [
                f"https://vip:{PROXY_PORT}/{name}?n={i}",
                "-o",
                str(self.dir / "loop" / str(i)),
            ]
            argv += ["-w", "%{num_connects} %{http_code}\\n"]
        return self.lab.popen(
            "client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def _check_loop(self) -> None:
        rows = [line.split() for line in self.loop_out.splitlines()]
        if self.loop_code != 0 or len(rows) != len(LOOP):
            self.problems.append(
                f"curl loop exited {self.loop_code} after {len(rows)} of {len(LOOP)} "
                f"requests: {self.loop_err.strip()}"
            )
            return
        connects = sum(int(r[0]) for r in rows)
        bad = [i for i, r in enumerate(rows) if r[1] != "200"]
        wrong = [
            i
            for i, name in enumerate(LOOP)
            if hashlib.sha256((self.dir / "loop" / str(i)).read_bytes()).hexdigest()
            != file_sha256(name)
        ]
        served = {
            host: sum(1 for r in self.nginx.access_log(host) if "?n=" in r["uri"])
            for host in ("a", "b")
        }
        if connects != 1 or bad or wrong:
            self.problems.append(
                f"curl loop: {connects} connections, non-200 at {bad}, bodies differ at {wrong}"
            )
        elif not served["a"] or not served["b"]:
            self.problems.append(f"curl loop: nginx served a {served['a']}, b {served['b']}")
        else:
            self.lines.append(
                f"  curl loop {len(LOOP)} requests to nginx behind pysteer on 1 keep-alive "
                f"connection, all 200, sha256 verified; nginx on a served {served['a']}, "
                f"on b {served['b']}"
            )

    def _move_and_drain(self, s_flow: str) -> None:
        node = "a"
        self.migrations = []
        for _ in range(self.moves):
            node = "b" if node == "a" else "a"
            out = self.cli("migrate", "--flow", s_flow, "--to", node, "--json")
            report = json.loads(out.stdout) if out.stdout else {"outcome": out.stderr}
            self.migrations.append(report)
            freeze = report.get("freeze_ms")
            say(
                f"pysteer migrate --flow {s_flow} --to {node}: {report['outcome']}"
                + (f", freeze {freeze:.2f} ms" if freeze else "")
            )
            if report["outcome"] != "moved":
                self.problems.append(f"migration to {node}: {report}")
            time.sleep(0.3)
        say("pysteer drain --from a --to b")
        drained = self.cli("drain", "--from", "a", "--to", "b", "--json")
        self.drain = json.loads(drained.stdout) if drained.stdout else None
        if drained.returncode != 0 or not self.drain:
            self.problems.append(f"drain: {drained.stderr.strip() or drained.returncode}")

    def _check_clients(self, body: Path, code: int, err: str) -> None:
        from pysteer.lab.clients import check_ticker_stream  # noqa: PLC0415

        for name, text, sent in (
            ("s_client", self.s_text, self.s_sent),
            ("plain", self.plain_text, self.plain_sent),
        ):
            try:
                ticks = check_ticker_stream(text, sent)
                self.lines.append(
                    f"  {name:<9} {ticks} ticks in sequence, {len(sent)} lines "
                    f"echoed in order, {len(text.encode())} bytes exact; largest "
                    f"gap {self.gaps[name] * 1000:.0f} ms (baseline "
                    f"{self.baseline[name] * 1000:.0f} ms)"
                )
            except StreamError as exc:
                self.problems.append(f"{name}: {exc}")
        data = body.read_bytes() if body.exists() else b""
        if code != 0:
            self.problems.append(f"curl exited {code}: {err.strip()}")
        elif hashlib.sha256(data).digest() != hashlib.sha256(http_body(DOWNLOAD)).digest():
            self.problems.append(f"curl: body differs ({len(data)} bytes)")
        else:
            self.lines.append(f"  curl      {len(data)} bytes over TLS, sha256 verified")
        self._check_loop()
        if self.rsts:
            self.problems.append(f"{len(self.rsts)} RST(s) sent to the clients: {self.rsts}")
        if self.counts["timeouts"]:
            self.problems.append(f"{self.counts['timeouts']} retransmission timeout(s)")
        if self.on_b != ["b"] * len(self.on_b):
            self.problems.append(f"after the drain, flows on {self.on_b}")

    def _report(self) -> None:
        print("\n==================== pysteer demo report ====================")
        for i, m in enumerate(getattr(self, "migrations", []), 1):
            freeze = f"freeze window {m['freeze_ms']:.2f} ms" if m.get("freeze_ms") else ""
            print(
                f"migration {i}: {m.get('from', '?')} -> {m.get('to', '?')}: "
                f"{m['outcome']} {freeze}"
            )
        d = getattr(self, "drain", None)
        if d:
            f = d["freeze_ms"]
            print(
                f"drain a -> b: {d['moved']} moved, {d['rolled_back']} rolled back, "
                f"{d['failed']} failed; freeze p50 {f['p50']} ms, p99 {f['p99']} ms"
            )
        print("clients (unmodified, in the client namespace):")
        for line in self.lines:
            print(line)
        if hasattr(self, "counts"):
            print(
                f"client link: {len(self.rsts)} RST to the clients ({len(self.own_rsts)} sent by "
                f"a client at its own close); client retransmissions {self.counts['retrans']}, "
                f"retransmission timeouts {self.counts['timeouts']}"
            )
            for line in self.own_rsts:
                print(f"  a client's own RST, at its close: {line}")
        if self.problems:
            print("RESULT: FAIL")
            for p in self.problems:
                print(f"  - {p}")
        else:
            print("RESULT: PASS: the clients noticed nothing")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    p.add_argument("--prefix", default="pdemo", help="lab name (default: pdemo)")
    p.add_argument("--moves", type=int, default=4, help="migrations of the s_client flow")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the cluster's files (logs, certificates, keys) afterwards; "
        "they are kept anyway when the demo finds a problem",
    )
    args = p.parse_args(argv)
    return Demo(args.prefix, args.moves, args.keep).run()


if __name__ == "__main__":
    sys.exit(main())
