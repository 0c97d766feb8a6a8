#!/usr/bin/env python3
"""Benchmark pysteer's TLS record layer against Python's ssl module, in one run.

For each suite: a server process sends N MB to a Python ssl client and receives N MB
back, over loopback; the server is either Python's ssl (the baseline) or pysteer's
TlsServerConnection on a plain socket. The ratio is baseline time / pysteer time (above 1:
pysteer is faster). Also: export and import time of the connection state, and its size.
TLS 1.3 suites are pinned for Python's ssl (which has no API for them) with OPENSSL_CONF.
Run: scripts/bench/tls_record.py [--mb 200] [--repeat 3] [--out results/bench/tls_record.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

from pysteer.certs import CertificateAuthority
from pysteer.tls import DataReceived, ServerConfig, TlsServerConnection

SUITES = {
    "TLS_AES_128_GCM_SHA256": ("1.3", "TLS_AES_128_GCM_SHA256"),
    "TLS_AES_256_GCM_SHA384": ("1.3", "TLS_AES_256_GCM_SHA384"),
    "TLS_CHACHA20_POLY1305_SHA256": ("1.3", "TLS_CHACHA20_POLY1305_SHA256"),
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": ("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": ("1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": ("1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
}
CHUNK = 1 << 20

CLIENT = r"""
import socket, ssl, sys
port, mb, cafile, version = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
ctx.minimum_version = ctx.maximum_version = v
raw = socket.create_connection(("127.0.0.1", port))
tls = ctx.wrap_socket(raw, server_hostname="localhost")
want, got = mb << 20, 0
while got < want:
    got += len(tls.recv(1 << 20))
block = b"u" * (1 << 20)
for _ in range(mb):
    tls.sendall(block)
tls.recv(1)
"""


def serve_ssl(sock: socket.socket, ctx: ssl.SSLContext, mb: int, suite: str) -> float:
    tls = ctx.wrap_socket(sock, server_side=True)
    if tls.cipher()[0] != suite:
        raise RuntimeError(f"baseline negotiated {tls.cipher()[0]}, not {suite}")
    block = b"d" * CHUNK
    start = time.perf_counter()
    for _ in range(mb):
        tls.sendall(block)
    want, got = mb << 20, 0
    while got < want:
        got += len(tls.recv(1 << 20))
    elapsed = time.perf_counter() - start
    tls.sendall(b"!")
    return elapsed


def serve_pysteer(sock: socket.socket, cfg: ServerConfig, mb: int) -> float:
    conn = TlsServerConnection(cfg)
    while conn.phase == "handshake":
        conn.receive_data(sock.recv(65536))
        sock.sendall(conn.data_to_send())
    block = b"d" * CHUNK
    start = time.perf_counter()
    for _ in range(mb):
        conn.send(block)
        sock.sendall(conn.data_to_send())
    want, got = mb << 20, 0
    while got < want:
        for event in conn.receive_data(sock.recv(1 << 20)):
            if isinstance(event, DataReceived):
                got += len(event.data)
    elapsed = time.perf_counter() - start
    conn.send(b"!")
    sock.sendall(conn.data_to_send())
    return elapsed


def worker(suite: str, impl: str, mb: int, pki_dir: Path) -> dict[str, float]:
    version, openssl_name = SUITES[suite]
    chain, key, ca = (pki_dir / n for n in ("chain.pem", "key.pem", "ca.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(listener.getsockname()[1]), str(mb), str(ca), version]
    )
    sock, _ = listener.accept()
    if impl == "ssl":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain, key)
        if version == "1.2":
            ctx.set_ciphers(openssl_name)
        elapsed = serve_ssl(sock, ctx, mb, openssl_name)
    else:
        cfg = ServerConfig(chain.read_bytes(), key.read_bytes(), suites=[suite])
        elapsed = serve_pysteer(sock, cfg, mb)
    client.wait(60)
    sock.close()
    result = {"seconds": elapsed}
    if impl == "pysteer":
        result |= state_costs(cfg, ca)
    return result


def state_costs(cfg: ServerConfig, ca: Path) -> dict[str, float]:
    """Export/import time and size of an established connection's state."""
    ctx = ssl.create_default_context(cafile=str(ca))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    conn = TlsServerConnection(cfg)
    while conn.phase == "handshake":
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        conn.receive_data(outgoing.read())
        incoming.write(conn.data_to_send())
    exports, imports = [], []
    for _ in range(2000):
        t0 = time.perf_counter()
        blob = msgpack.packb(conn.export_state())
        t1 = time.perf_counter()
        conn = TlsServerConnection.from_state(msgpack.unpackb(blob))
        t2 = time.perf_counter()
        exports.append(t1 - t0)
        imports.append(t2 - t1)
    return {
        "export_us": round(statistics.median(exports) * 1e6, 2),
        "import_us": round(statistics.median(imports) * 1e6, 2),
        "state_bytes": len(blob),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="MB each way (200)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per suite and side (3)")
    parser.add_argument("--out", type=Path, default=Path("results/bench/tls_record.json"))
    parser.add_argument(
        "--worker", nargs=4, metavar=("SUITE", "IMPL", "MB", "PKI"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        suite, impl, mb, pki = args.worker
        print(json.dumps(worker(suite, impl, int(mb), Path(pki))))
        return 0
    keys = tempfile.TemporaryDirectory(prefix="pysteer-bench-")  # removed at exit, whatever happens
    tmp = Path(keys.name)
    ca = CertificateAuthority()
    leaf = ca.issue("localhost", names=["localhost", "127.0.0.1"], kind="ecdsa")
    (tmp / "ca.pem").write_bytes(ca.cert_pem)
    (tmp / "chain.pem").write_bytes(leaf.chain_pem)
    (tmp / "key.pem").write_bytes(leaf.key_pem)
    results: dict[str, dict] = {}
    for suite, (version, _name) in SUITES.items():
        conf = tmp / f"{suite}.cnf"
        conf.write_text(
            "openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = sys\n"
            f"[sys]\nCiphersuites = {suite if version == '1.3' else 'TLS_AES_128_GCM_SHA256'}\n"
        )
        env = {**os.environ, "OPENSSL_CONF": str(conf)}
        runs: dict[str, list[dict]] = {"ssl": [], "pysteer": []}
        for _ in range(args.repeat):
            for impl in ("ssl", "pysteer"):
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", suite, impl, str(args.mb), str(tmp)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[impl].append(json.loads(out.stdout.splitlines()[-1]))
        ratios = [
            s["seconds"] / p["seconds"] for s, p in zip(runs["ssl"], runs["pysteer"], strict=True)
        ]
        last = runs["pysteer"][-1]
        results[suite] = {
            "mb_each_way": args.mb,
            "ssl_seconds": [round(r["seconds"], 3) for r in runs["ssl"]],
            "pysteer_seconds": [round(r["seconds"], 3) for r in runs["pysteer"]],
            "median_ratio_ssl_over_pysteer": round(statistics.median(ratios), 3),
            "export_us": last["export_us"],
            "import_us": last["import_us"],
            "state_bytes": last["state_bytes"],
        }
        r = results[suite]
        print(
            f"{suite:<46} ratio {r['median_ratio_ssl_over_pysteer']:.2f}  export "
            f"{r['export_us']:.0f} µs  import {r['import_us']:.0f} µs  "
            f"state {r['state_bytes']} B",
            flush=True,
        )
    report = {
        "benchmark": "tls_record",
        "bar": "median ratio >= 0.9 for every suite",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
