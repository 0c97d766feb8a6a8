"""Unmodified clients (openssl s_client, Python ssl, curl, gnutls-cli) against pysteer's
TLS layer, for every suite it carries, byte-exact."""

import hashlib
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest
from conftest import Pki
from helpers.tls_server import TlsTestServer

from pysteer.app.handlers import http_body
from pysteer.tls import ConnectionClosed, DataReceived, ServerConfig

# (IANA suite, server key kind, version, OpenSSL name, gnutls priority part)
SUITES = [
    ("TLS_AES_128_GCM_SHA256", "ecdsa", "1.3", "TLS_AES_128_GCM_SHA256", "+AES-128-GCM"),
    ("TLS_AES_256_GCM_SHA384", "ecdsa", "1.3", "TLS_AES_256_GCM_SHA384", "+AES-256-GCM"),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        "rsa",
        "1.3",
        "TLS_CHACHA20_POLY1305_SHA256",
        "+CHACHA20-POLY1305",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ecdsa",
        "1.2",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "+AES-128-GCM",
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "rsa",
        "1.2",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "+AES-256-GCM",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ecdsa",
        "1.2",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "+CHACHA20-POLY1305",
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "rsa",
        "1.2",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "+AES-128-GCM",
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "rsa",
        "1.2",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "+CHACHA20-POLY1305",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ecdsa",
        "1.2",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "+AES-256-GCM",
    ),
]
IDS = [s[0] for s in SUITES]


def server_for(pki: Pki, suite: tuple, app: str = "echo") -> TlsTestServer:
    name, kind = suite[0], suite[1]
    cfg = ServerConfig(pki.servers[kind].chain_pem, pki.servers[kind].key_pem, suites=[name])
    return TlsTestServer(cfg, app)


def lines(count: int, seed: int = 0) -> bytes:
    return b"".join(b"%06d %s\n" % (i, os.urandom(20).hex().encode()) for i in range(count))


def interact(argv: list[str], payload: bytes, expect: int | None = None) -> bytes:
    """Run a client, write ``payload``, read until ``expect`` bytes (or EOF), then end input."""
    expect = len(payload) if expect is None else expect
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    writer = threading.Thread(target=proc.stdin.write, args=(payload,))
    writer.start()
    out = b""
    deadline = time.monotonic() + 30
    while len(out) < expect and time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        out += chunk
    writer.join(10)
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    rest, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert len(out + rest) >= expect, err
    return out + rest


def assert_served(server: TlsTestServer, suite: tuple, received: bytes) -> None:
    deadline = time.monotonic() + 10
    while not server.served and time.monotonic() < deadline:
        time.sleep(0.01)
    served = server.wait(1)[0]
    assert served.error is None
    hs = served.handshake
    assert hs is not None
    assert (hs.suite, hs.version) == (suite[0], f"TLSv{suite[2]}")
    got = b"".join(e.data for e in served.events if isinstance(e, DataReceived))
    assert got == received
    assert isinstance(served.events[-1], ConnectionClosed)


@pytest.mark.parametrize("suite", SUITES, ids=IDS)
def test_python_ssl(pki: Pki, suite: tuple) -> None:
    payload = os.urandom(3 << 20)
    with server_for(pki, suite) as server:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        version = ssl.TLSVersion.TLSv1_3 if suite[2] == "1.3" else ssl.TLSVersion.TLSv1_2
        ctx.minimum_version = ctx.maximum_version = version
        if suite[2] == "1.2":
            ctx.set_ciphers(suite[3])
        raw = socket.create_connection(("127.0.0.1", server.port))
        with raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.settimeout(20)
            assert tls.cipher()[0] == suite[3]
            got = bytearray()
            for pos in range(0, len(payload), 100_000):
                tls.sendall(payload[pos : pos + 100_000])
                while len(got) < min(pos + 100_000, len(payload)) - 200_000:
                    got += tls.recv(1 << 20)
            tls.sendall(b"\nBYE\n")
            while chunk := tls.recv(1 << 20):
                got += chunk
            assert bytes(got) == payload + b"\nBYE\n"
        assert_served(server, suite, payload + b"\nBYE\n")


@pytest.mark.parametrize("suite", SUITES, ids=IDS)
def test_openssl_s_client(pki: Pki, suite: tuple) -> None:
    payload = lines(2000) + b"BYE\n"
    with server_for(pki, suite) as server:
        version = (
            ["-tls1_3", "-ciphersuites", suite[3]]
            if suite[2] == "1.3"
            else ["-tls1_2", "-cipher", suite[3]]
        )
        out = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{server.port}",
                "-servername",
                "localhost",
                "-CAfile",
                str(pki.ca_file),
                "-verify_return_error",
                "-quiet",
                *version,
            ],
            input=payload,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == payload
        assert_served(server, suite, payload)


@pytest.mark.parametrize("suite", SUITES, ids=IDS)
def test_gnutls_cli(pki: Pki, suite: tuple) -> None:
    payload = lines(2000) + b"BYE\n"
    kx = "" if suite[2] == "1.3" else f":-KX-ALL:+ECDHE-{suite[1].upper()}"
    priority = f"NORMAL:-VERS-ALL:+VERS-TLS{suite[2]}:-CIPHER-ALL:{suite[4]}{kx}"
    with server_for(pki, suite) as server:
        # gnutls-cli quits at the end of its input: keep stdin open until the echo is back.
        stdout = interact(
            [
                "gnutls-cli",
                "--x509cafile",
                str(pki.ca_file),
                "--priority",
                priority,
                "--logfile",
                "/dev/null",
                "-p",
                str(server.port),
                "localhost",
            ],
            payload,
        )
        assert stdout == payload
        assert_served(server, suite, payload)


@pytest.mark.parametrize("suite", SUITES, ids=IDS)
def test_curl_download(pki: Pki, suite: tuple, tmp_path) -> None:
    size = 5_000_017
    target = tmp_path / "body"
    version = (
        ["--tlsv1.3", "--tls13-ciphers", suite[3]]
        if suite[2] == "1.3"
        else ["--tlsv1.2", "--tls-max", "1.2", "--ciphers", suite[3]]
    )
    with server_for(pki, suite, app="http") as server:
        out = subprocess.run(
            [
                "curl",
                "--silent",
                "--show-error",
                "--fail",
                "--http1.1",
                "--cacert",
                str(pki.ca_file),
                "--resolve",
                f"localhost:{server.port}:127.0.0.1",
                *version,
                "-o",
                str(target),
                "-H",
                "Connection: close",
                f"https://localhost:{server.port}/bytes/{size}",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        body = target.read_bytes()
        assert len(body) == size
        assert hashlib.sha256(body).digest() == hashlib.sha256(http_body(size)).digest()
        served = server.wait(1)[0]
        assert served.error is None
        assert served.handshake.suite == suite[0]
