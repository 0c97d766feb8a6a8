"""Every control link checks who is calling, not only that the CA signed its certificate,
and which version of pysteer's RPC it speaks.

A real cluster on a lab: certificates minted with the cluster's own CA but for the wrong
purpose or the wrong name (the client-facing service certificate, one without an
extendedKeyUsage, one for serverAuth only, one whose CN and SAN disagree, one for a name
that is no node) are each refused by the steering daemon's mutual-TLS listener and by an
agent's peer listener, and each refusal is logged with its reason. A node's own
certificate gets through both, so the test can tell a refusal from a broken listener.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.cluster import Cluster, running_cluster
from helpers.waiting import wait_until

from pysteer.certs import CertificateAuthority
from pysteer.lab.cluster import AGENT_PORT, STEER_PORT
from pysteer.rpc import VERSION
from pysteer.rpc.codec import Decoder, encode, hello

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("identity")) as c:
        yield c


def minted(cluster: Cluster, tmp: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (chain, key): certificates the cluster CA signs, mostly for the wrong use."""
    d = cluster.dir
    ca = CertificateAuthority.load((d / "ca.pem").read_bytes(), (d / "ca.key").read_bytes())
    specs = {
        "no-eku": ("a", ["a"], "any"),
        "server-only": ("a", ["a"], "server"),
        "cn-san-differ": ("a", ["b"], "node"),
        "not-a-node": ("vip", ["vip"], "node"),
    }
    files = {"service": (d / "service.pem", d / "service.key"), "node": (d / "a.pem", d / "a.key")}
    for name, (cn, sans, usage) in specs.items():
        issued = ca.issue(cn, names=sans, usage=usage)
        (tmp / f"{name}.pem").write_bytes(issued.chain_pem)
        (tmp / f"{name}.key").write_bytes(issued.key_pem)
        files[name] = (tmp / f"{name}.pem", tmp / f"{name}.key")
    return files


def call(
    cluster: Cluster, address: tuple[str, int], server: str, cert: tuple[Path, Path], request: bytes
) -> bytes:
    """From host a's namespace: handshake with ``cert``, send ``request``, read what comes
    back until the server hangs up or stays silent for a second (b"" if it hung up at
    once; an SSLError if it refused during the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cluster.dir / "ca.pem")
    ctx.load_cert_chain(*cert)

    def go() -> bytes:
        with socket.create_connection(address, timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=server) as tls:
                    tls.sendall(request)
                    data = tls.recv(65536)
                    tls.settimeout(1)
                    with contextlib.suppress(TimeoutError):
                        while chunk := tls.recv(65536):
                            data += chunk
                    return data
            except ssl.SSLError as exc:  # TLS 1.3: the verdict comes after our Finished
                return f"refused: {exc.reason}".encode()
            except ConnectionError:
                return b""

    return cluster.lab.call("a", go)


def rpc(*requests: dict) -> bytes:
    """A connection's first bytes in pysteer's RPC: the hello, then ``requests``."""
    return encode(hello()) + b"".join(encode(r) for r in requests)


def answers(data: bytes) -> list[dict]:
    """Every answer in ``data``, its hello's first (checked, and left out)."""
    decoder, out = Decoder(), []
    decoder.feed(data)
    while (message := decoder.next()) is not None:
        out.append(message)
    assert out[:1] == [{"ok": True, "rpc": "hello", "version": VERSION}], (data[:200], out)
    return out[1:]


REFUSED = ["service", "no-eku", "server-only", "cn-san-differ", "not-a-node"]
REASONS = {
    "service": "CERTIFICATE_VERIFY_FAILED|certificate verify failed",  # another CA altogether
    "no-eku": "no extendedKeyUsage",
    "server-only": "unsuitable certificate purpose|no clientAuth",  # OpenSSL sees it
    "cn-san-differ": "'a' is not among the certificate's DNS names",
    "not-a-node": "'vip' is not an identity allowed here",
}


def test_steering_daemon_checks_identity(cluster: Cluster, tmp_path: Path) -> None:
    files = minted(cluster, tmp_path)
    plan = cluster.lab.plan
    address = (str(plan.link(plan.hosts[0]).steer_end.v4.ip), STEER_PORT)
    hosts = rpc({"cmd": "hosts"})
    answer = call(cluster, address, plan.steer, files["node"], hosts)
    assert answers(answer)[0]["ok"] is True, answer
    for name in REFUSED:
        before = cluster.log(plan.steer).count("refused a control connection")
        answer = call(cluster, address, plan.steer, files[name], hosts)
        assert b"ok" not in answer, (name, answer)
        wait_until(
            lambda n=before: cluster.log(plan.steer).count("refused a control connection") > n,
            timeout=5,
            what=f"the daemon logs refusing {name}",
        )
        last = cluster.log(plan.steer).rsplit("refused a control connection", 1)[1]
        assert re.search(REASONS[name], last.splitlines()[0]), (name, last[:300])
    # Still serving: refusals never stop the listener.
    assert answers(call(cluster, address, plan.steer, files["node"], hosts))[0]["ok"] is True


def test_agent_checks_identity(cluster: Cluster, tmp_path: Path) -> None:
    files = minted(cluster, tmp_path)
    address = (str(cluster.lab.plan.address("b")), AGENT_PORT)
    ask_b = rpc({"op": "hello"})
    assert answers(call(cluster, address, "b", files["node"], ask_b))[0]["node"] == "b"
    for name in REFUSED:
        before = cluster.log("b").count("refused a peer connection")
        answer = call(cluster, address, "b", files[name], ask_b)
        assert b"ok" not in answer and b"node" not in answer, (name, answer)
        wait_until(
            lambda n=before: cluster.log("b").count("refused a peer connection") > n,
            timeout=5,
            what=f"agent b logs refusing {name}",
        )
        last = cluster.log("b").rsplit("refused a peer connection", 1)[1]
        assert re.search(REASONS[name], last.splitlines()[0]), (name, last[:300])
    assert answers(call(cluster, address, "b", files["node"], ask_b))[0]["node"] == "b"


def test_links_check_the_server_they_reach(cluster: Cluster, tmp_path: Path) -> None:
    """A link refuses a server whose certificate chains to the cluster CA and carries the
    right name but is not a node's (no EKU, serverAuth only, clientAuth only): the CLI's
    remote path, to a rogue listener in a's namespace that presents such a certificate
    for "b"."""
    from pysteer.agent.control import AgentDown, ask_remote  # noqa: PLC0415
    from pysteer.identity import client_context  # noqa: PLC0415

    d = cluster.dir
    ca = CertificateAuthority.load((d / "ca.pem").read_bytes(), (d / "ca.key").read_bytes())
    ctx = client_context(d / "a.pem", d / "a.key", d / "ca.pem")
    netns = cluster.lab.netns("a")
    for usage, error in [
        ("any", "no extendedKeyUsage"),
        ("server", "not a node's: no clientAuth"),  # a server certificate, not a node's
        ("client", "unsuitable certificate purpose|no serverAuth"),
    ]:
        rogue = ca.issue("b", names=["b"], usage=usage)
        (tmp_path / "rogue.pem").write_bytes(rogue.chain_pem)
        (tmp_path / "rogue.key").write_bytes(rogue.key_pem)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tmp_path / "rogue.pem", tmp_path / "rogue.key")
        listener = cluster.lab.call("a", socket.create_server, ("127.0.0.1", 0))
        served: list[bytes] = []

        def serve(
            listener: socket.socket = listener,
            server_ctx: ssl.SSLContext = server_ctx,
            served: list[bytes] = served,
        ) -> None:
            with listener, listener.accept()[0] as raw:
                raw.settimeout(5)
                try:
                    with server_ctx.wrap_socket(raw, server_side=True) as tls:
                        served.append(tls.recv(4096))
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve)
        thread.start()
        with pytest.raises(AgentDown, match=error):
            ask_remote(listener.getsockname()[:2], ctx, "b", "status", netns=netns)
        thread.join(10)
        assert served in ([], [b""]), served  # no request ever went to the rogue server


def test_a_host_speaks_only_for_itself(cluster: Cluster) -> None:
    """Host a's certificate gets a's requests answered, not b's: a sync, close notice or
    claim naming b is refused, and so are the operator's commands (they need the steering
    node's root-only socket). Before, the daemon checked the chain, then trusted ``host``."""
    d, plan = cluster.dir, cluster.lab.plan
    address = (str(plan.link(plan.hosts[0]).steer_end.v4.ip), STEER_PORT)
    flow = f"{plan.address('client')}:40000-{plan.vip(4)}:443"
    refused = {
        "sync-as-b": ({"cmd": "sync", "host": "b", "flows": []}, "host must be the caller (a)"),
        "closed-as-b": ({"cmd": "closed", "host": "b", "flows": [flow]}, "must be the caller"),
        "claim-as-b": (
            {"cmd": "claim", "host": "b", "flow": flow, "token": 1},
            "must be the caller",
        ),
        "park-owned-by-b": ({"cmd": "park", "flow": flow, "owner": "b"}, "must be the caller"),
        "forget": ({"cmd": "forget", "flow": flow}, "is not an agent's command"),
        "to": ({"cmd": "to", "flow": flow, "host": "a"}, "is not an agent's command"),
        "gc": ({"cmd": "gc"}, "is not an agent's command"),
    }
    a = (d / "a.pem", d / "a.key")
    for name, (request, error) in refused.items():
        (answer,) = answers(call(cluster, address, plan.steer, a, rpc(request)))
        assert answer["ok"] is False and error in answer["error"], (name, answer)
    own = {"cmd": "sync", "host": "a", "flows": [], "done": False}  # a part: changes nothing
    (answer,) = answers(call(cluster, address, plan.steer, a, rpc(own)))
    assert answer["ok"] is True, answer


def test_listeners_refuse_another_version(cluster: Cluster) -> None:
    """Every listener of a node (the steering daemon's TLS listener, an agent's peer
    listener and its local control socket) refuses a client of another RPC version, after
    its identity is checked: one answer that names both versions, then it hangs up. A
    client of the JSON lines before gets that answer as a JSON line. Both are logged, and
    the listeners serve the right version as before."""
    d, plan = cluster.dir, cluster.lab.plan
    a = (d / "a.pem", d / "a.key")
    newer = encode(hello() | {"version": VERSION + 1}) + encode({"cmd": "hosts"})
    old = json.dumps({"cmd": "hosts"}).encode() + b"\n"
    steer = (str(plan.link(plan.hosts[0]).steer_end.v4.ip), STEER_PORT)
    agent_b = (str(plan.address("b")), AGENT_PORT)
    listeners: list[tuple[str, Callable[[bytes], bytes], str, str]] = [
        (
            "this steering daemon",
            lambda data: call(cluster, steer, plan.steer, a, data),
            plan.steer,
            "refused a control client",
        ),
        (
            "this agent (b)",
            lambda data: call(cluster, agent_b, "b", a, data),
            "b",
            "peer link from a dropped",
        ),
        ("this agent (b)", lambda data: local(cluster, "b", data), "b", "refused a control client"),
    ]
    for speaker, send, log_of, logged in listeners:
        decoder = Decoder()
        decoder.feed(send(newer))
        assert decoder.next() == {
            "ok": False,
            "code": "version",
            "error": f"{speaker} speaks pysteer RPC version {VERSION}; the client speaks "
            f"version {VERSION + 1}: run the same version on both ends (upgrade the older one)",
        }
        assert decoder.next() is None and not decoder.pending  # nothing more: it hung up
        answer = json.loads(send(old))
        assert answer["ok"] is False and answer["code"] == "version", answer
        assert answer["error"].startswith(
            f"{speaker} speaks pysteer RPC version {VERSION} (length-prefixed msgpack frames); "
            "the client sent a JSON line, so it speaks version 0"
        )
        wait_until(
            lambda who=log_of, line=f"{logged}: {speaker} speaks pysteer RPC version": (
                cluster.log(who).count(line) >= 1
            ),
            timeout=5,
            what=f"{log_of} logs the refusal",
        )
        assert "Traceback" not in cluster.log(log_of)
    assert answers(call(cluster, steer, plan.steer, a, rpc({"cmd": "hosts"})))[0]["ok"]
    assert answers(local(cluster, "b", rpc({"cmd": "status"})))[0]["ok"]


def local(cluster: Cluster, node: str, data: bytes) -> bytes:
    """Send ``data`` to ``node``'s local control socket; what comes back until it hangs up
    or stays silent for a second."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(f"/run/pysteer/{cluster.lab.prefix}/agent-{node}.sock")
        sock.sendall(data)
        got = sock.recv(65536)
        sock.settimeout(1)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                got += chunk
    return got
