"""The demo (``scripts/demo``): live TLS and TCP connections moved between lab hosts.

It builds the lab, starts the steering daemon and both agents, connects unmodified clients
from the client namespace (``openssl s_client`` on the TLS ticker, a plain TCP line client,
a rate-limited curl download over TLS), moves the s_client flow back and forth with
``pysteer migrate``, drains host a to b with ``pysteer drain``, then checks what every
client saw and prints a report. Exit status 0 only if no client noticed anything: every
byte and line exact, no RST sent to a client, no retransmission timeout.
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
from pysteer.lab.clients import LineClient, RstCapture, Session, StreamError, netstat
from pysteer.lab.cluster import LabCluster
from pysteer.lab.plan import load
from pysteer.lab.topology import Lab, LabError

PYSTEER = [sys.executable, "-m", "pysteer"]
DOWNLOAD = 24_000_000  # bytes, at 3 MB/s: it spans the migrations and the drain


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
        self.cluster = LabCluster(self.lab, self.dir)
        try:
            say(
                "starting the steering daemon and the agents (TLS ticker on :443, "
                "HTTP on :8443, plain ticker on :7000)"
            )
            self.cluster.start()
            self._scenario()
        finally:
            say("cleaning up")
            self.cluster.close()
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
            s_client.start_writing()
            time.sleep(1.0)
            quiet = (time.monotonic() - 0.8, time.monotonic())
            baseline = {
                "s_client": s_client.largest_gap(*quiet),
                "plain": plain.largest_gap(*quiet),
            }
            flows = {f["flow"]: f for f in self.flows()}
            s_flow = next(f for f in flows if f.endswith(":443"))
            say(f"{len(flows)} client connections on host a: s_client, plain TCP, curl")
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
