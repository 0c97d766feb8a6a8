"""The steering node in the lab: redirect from the first SYN, and live moves with parking."""

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers.migration import RstCapture, connect, listen, netstat, wire_round_trip

from pysteer import tcp
from pysteer.flow import Flow
from pysteer.lab import Lab
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.netns import call_in as netns_call
from pysteer.steer.steerer import Steerer, SteerError

PORT = 8000
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def make_steerer(lab: Lab, mode: str) -> Steerer:
    st = Steerer(unique_prefix(), "to-client", namespace=lab.netns("steer"), mode=mode)
    for host in lab.plan.hosts:
        st.add_host(host, f"to-{host}", lab.mac(host, "to-steer"))
    return st


@pytest.fixture
def steered(lab: Lab) -> Iterator[tuple[Lab, Steerer]]:
    st = make_steerer(lab, "tc")
    yield lab, st
    st.destroy()


def client_socket(lab: Lab, family: int, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(FAMILIES[family], socket.SOCK_STREAM)
        s.bind((str(lab.plan.address("client", family)), port))
        s.settimeout(10)
        return s

    return lab.call("client", make)


def native_xdp_on_veth(lab: Lab) -> None:
    """What native XDP redirect between veths needs (docs/tuning.md): GRO (or an
    XDP program) on the target's peer, and no TX checksum offload on the sender."""
    for host in lab.plan.hosts:
        lab.run(host, ["ethtool", "-K", "to-steer", "gro", "on"])
    lab.run("client", ["ethtool", "-K", "to-steer", "tx", "off"])


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", ["tc", "xdp-generic", "xdp-native"])
def test_flow_steered_to_b_from_the_first_syn(lab: Lab, mode: str, family: int) -> None:
    if mode == "xdp-native":
        native_xdp_on_veth(lab)
    st = make_steerer(lab, mode)
    try:
        vip = str(lab.plan.vip(family))
        on_a = lab.call("a", listen, FAMILIES[family], vip, PORT)
        on_b = lab.call("b", listen, FAMILIES[family], vip, PORT)
        client = client_socket(lab, family, 41000)
        flow = Flow.parse(str(Flow.of_server_socket((vip, PORT), client.getsockname())))
        st.to(flow, "b")
        client.connect((vip, PORT))
        on_b.settimeout(5)
        server, peer = on_b.accept()
        assert peer[0] == str(lab.plan.address("client", family))
        for i in range(50):  # small packets both ways
            client.sendall(b"ping %d\n" % i)
            got = b""
            while not got.endswith(b"\n"):
                got += server.recv(100)
            server.sendall(got.upper())
            echo = b""
            while not echo.endswith(b"\n"):
                echo += client.recv(100)
            assert echo == b"PING %d\n" % i
        on_a.settimeout(0)
        with pytest.raises(BlockingIOError):
            on_a.accept()  # host a never saw the flow
        value = st.get(flow)
        assert value.packets[2] >= 51  # SYN, ACK and 50 data segments, all redirected
        assert value.packets[0] == value.packets[1] == 0
        assert st.stats()["drop_no_host"] == 0
        for s in (client, server, on_a, on_b):
            s.close()
    finally:
        st.destroy()


@pytest.mark.parametrize("mode", ["tc", "xdp-generic", "xdp-native"])
def test_bulk_100mb_steered(lab: Lab, mode: str) -> None:
    """With the offloads on: generic XDP cannot redirect GSO super-packets, so it passes
    them up to the tc program the loader attaches as its fallback."""
    if mode == "xdp-native":
        native_xdp_on_veth(lab)
    st = make_steerer(lab, mode)
    try:
        _bulk(lab, st)
        fallback = st.stats()["xdp_fallback"]
        if mode == "xdp-generic":
            assert fallback > 0  # the sender's GSO packets went to the tc fallback
        else:
            assert fallback == 0  # tc: no XDP; native XDP on veth: TSO is off with tx csum
    finally:
        st.destroy()


def _bulk(lab: Lab, st: Steerer) -> None:
    vip = str(lab.plan.vip_v4)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
    client = client_socket(lab, 4, 41001)
    flow = Flow.parse(f"{lab.plan.address('client')}:41001-{vip}:{PORT}")
    st.to(flow, "b")
    client.connect((vip, PORT))
    server, _ = on_b.accept()
    server.settimeout(30)
    block, total = os.urandom(1 << 20), 100
    digest = hashlib.sha256()

    def receive() -> None:
        got = 0
        while got < total << 20:
            data = server.recv(1 << 20)
            digest.update(data)
            got += len(data)

    reader = threading.Thread(target=receive)
    reader.start()
    for _ in range(total):
        client.sendall(block)
    reader.join(60)
    assert digest.digest() == hashlib.sha256(block * total).digest()
    view = st.get(flow)
    assert view.bytes[2] >= total << 20  # every byte went through the redirect
    assert view.packets[0] == view.packets[1] == 0
    for s in (client, server, on_b):
        s.close()


class EchoLines(threading.Thread):
    """The server side: echo lines back; between reads, perform the moves asked of it."""

    def __init__(self, lab: Lab, st: Steerer, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.lab, self.st, self.sock = lab, st, sock
        self.host = lab.plan.default_host
        self.requests: list[threading.Event] = []
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.replayed = 0
        self.hold = 0.0  # seconds the flow stays parked during a move

    def move(self) -> None:
        local, peer = self.sock.getsockname(), self.sock.getpeername()
        flow = Flow.of_server_socket(local, peer)
        target = "b" if self.host == "a" else "a"
        self.st.park(flow)  # before repair mode: a frozen socket still ACKs
        time.sleep(self.hold)
        state = tcp.dump(self.sock)
        new = self.lab.call(target, tcp.restore, wire_round_trip(state))
        self.replayed += self.st.to(flow, target)
        tcp.release(self.sock)
        self.sock, self.host = new, target
        self.sock.settimeout(0.002)

    def run(self) -> None:
        self.sock.settimeout(0.002)
        buf = b""
        try:
            while not self.stop.is_set():
                with self.lock:
                    pending, self.requests = self.requests, []
                for done in pending:
                    self.move()
                    done.set()
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                buf += data
                *lines, buf = buf.split(b"\n")
                if lines:  # the 2 ms poll timeout is for recv only: a bulk client that
                    # reads in bursts can keep a sendall waiting longer, on a busy machine
                    self.sock.settimeout(10)
                    self.sock.sendall(b"".join(line + b"\n" for line in lines))
                    self.sock.settimeout(0.002)
        except BaseException as exc:
            self.error = exc

    def request_move(self) -> None:
        done = threading.Event()
        with self.lock:
            self.requests.append(done)
        assert done.wait(10), self.error


def run_moves(
    lab: Lab, st: Steerer, *, moves: int, hold: float = 0.0, bulk: bool = False
) -> dict[str, int]:
    """Echo traffic (a line per millisecond, or bulk) while the server moves ``moves``
    times; checks the stream byte for byte and that no RST crossed the client's link."""
    vip = str(lab.plan.vip_v4)
    listeners = [lab.call(h, listen, socket.AF_INET, vip, PORT) for h in lab.plan.hosts]
    client = lab.call("client", connect, socket.AF_INET, vip, PORT)
    server, _ = listeners[0].accept()
    ext0, tcp0 = lab.call("client", netstat, "TcpExt"), lab.call("client", netstat, "Tcp")
    echo = EchoLines(lab, st, server)
    echo.hold = hold
    sent, received, errors = [b""], [b""], []

    def client_loop(talking: threading.Event) -> None:
        client.settimeout(0.001)
        n = 0
        try:
            while talking.is_set():
                chunk = b"".join(b"line %06d\n" % (n + i) for i in range(400 if bulk else 1))
                n += 400 if bulk else 1
                client.settimeout(5)
                client.sendall(chunk)
                client.settimeout(0.001)
                sent[0] += chunk
                deadline = time.monotonic() + 0.001
                while time.monotonic() < deadline or len(sent[0]) - len(received[0]) > 1 << 20:
                    with contextlib.suppress(TimeoutError):
                        received[0] += client.recv(1 << 20)
        except BaseException as exc:
            errors.append(exc)

    talking = threading.Event()
    talking.set()
    with RstCapture(lab, "client", "to-steer") as capture:
        echo.start()
        talker = threading.Thread(target=client_loop, args=(talking,), daemon=True)
        talker.start()
        for _ in range(moves):
            time.sleep(0.02)
            echo.request_move()
        time.sleep(0.05)
        talking.clear()  # the client stops first; the server echoes to the last byte
        talker.join(10)
        client.settimeout(10)
        try:
            while len(received[0]) < len(sent[0]):
                received[0] += client.recv(1 << 20)
        except TimeoutError:
            state = {n: lab.run(n, ["ss", "-tin"], check=False).stdout for n in lab.plan.nodes}
            raise AssertionError(
                f"stalled: got {len(received[0])} of {len(sent[0])} bytes; {errors=}; "
                f"{echo.error=}; counters={dict(st.counters)}; flows={st.items()}; {state}"
            ) from None
        echo.stop.set()
        echo.join(5)
    ext1, tcp1 = lab.call("client", netstat, "TcpExt"), lab.call("client", netstat, "Tcp")
    assert errors == []
    assert echo.error is None
    assert received[0] == sent[0]
    assert capture.count == 0, capture.lines
    for s in (client, echo.sock, *listeners):
        s.close()
    counters = list(st.counters.values())
    return {
        "timeouts": ext1["TCPTimeouts"] - ext0["TCPTimeouts"],
        "retrans": tcp1["RetransSegs"] - tcp0["RetransSegs"],
        "parked": sum(c.parked for c in counters),
        "replayed": sum(c.replayed for c in counters),
        "dropped": sum(c.dropped for c in counters),
        "lost": sum(c.lost for c in counters),
        "moved_replayed": echo.replayed,
        "bytes": len(sent[0]),
    }


def test_live_moves_with_parking(steered: tuple[Lab, Steerer]) -> None:
    """50 moves of a live connection, A<->B, in the order park, dump, restore, to, release.
    The client writes a line every millisecond and checks every echo."""
    lab, st = steered
    r = run_moves(lab, st, moves=50)
    assert r["timeouts"] == 0
    assert r["retrans"] <= 50, r
    assert r["parked"] == r["replayed"] == r["moved_replayed"]
    assert r["dropped"] == r["lost"] == 0
    print(f"\n50 moves: {r}")


@pytest.mark.parametrize("bulk", [False, True], ids=["lines", "bulk"])
def test_long_park_replays_everything(steered: tuple[Lab, Steerer], bulk: bool) -> None:
    """Parked for 200 ms: every packet is replayed in order (probes and retransmissions
    of the client during so long a park are expected, and reported)."""
    lab, st = steered
    r = run_moves(lab, st, moves=3, hold=0.2, bulk=bulk)
    assert r["parked"] == r["replayed"] > 3
    assert r["dropped"] == r["lost"] == 0
    print(f"\n200 ms parks ({'bulk' if bulk else 'lines'}): {r}")


def test_park_over_the_bound_drops_counts_and_recovers(lab: Lab) -> None:
    st = make_steerer(lab, "tc")
    st.max_per_flow = 2
    try:
        r = run_moves(lab, st, moves=2, hold=0.2)
    finally:
        st.destroy()
    assert r["dropped"] > 0
    assert r["parked"] == r["replayed"]
    print(f"\nover the bound: {r}")


def test_guard_keeps_a_host_from_sending_rst(steered: tuple[Lab, Steerer]) -> None:
    """A's socket is released while the flow still routes to A. With the guard, the
    client's next packet is dropped on A; without it (the control), A answers with a RST."""
    from pysteer.steer.guard import Guard  # noqa: PLC0415

    lab, _st = steered
    vip = str(lab.plan.vip_v4)
    listener = lab.call("a", listen, socket.AF_INET, vip, PORT)
    guard = Guard(unique_prefix(), "to-steer", namespace=lab.netns("a"))
    try:
        results = {}
        for guarded in (True, False):
            client = lab.call("client", connect, socket.AF_INET, vip, PORT)
            server, _ = listener.accept()
            flow = Flow.of_server_socket(server.getsockname(), server.getpeername())
            if guarded:
                guard.freeze(flow)
            tcp.dump(server)
            tcp.release(server)
            with RstCapture(lab, "client", "to-steer") as capture:
                client.sendall(b"anyone there?")
                time.sleep(0.3)
            results[guarded] = (capture.count, guard.thaw(flow) if guarded else 0)
            client.close()
        assert results[True][0] == 0
        assert results[True][1] >= 1  # the guard dropped the client's segment(s)
        assert results[False][0] >= 1  # the control: without the guard, A resets
        assert guard.dropped() >= 1
    finally:
        guard.destroy()
        listener.close()


def test_bad_requests(steered: tuple[Lab, Steerer]) -> None:
    lab, st = steered
    flow = Flow.parse(f"{lab.plan.address('client')}:41002-{lab.plan.vip_v4}:{PORT}")
    with pytest.raises(SteerError, match=r"unknown host 'c' \(known: a, b\)"):
        st.to(flow, "c")
    with pytest.raises(SteerError, match="is not in the table"):
        st.forget(flow)
    with pytest.raises(SteerError, match="already configured"):
        st.add_host("a", "to-a", "02:00:00:00:00:01")
    with pytest.raises(SteerError, match="no interface 'nope'"):
        st.add_host("z", "nope", "02:00:00:00:00:01")


def test_auto_mode_picks_tc_on_veth_and_falls_back_without_native_xdp(lab: Lab) -> None:
    from pysteer.steer import loader  # noqa: PLC0415

    st = make_steerer(lab, "auto")
    try:
        assert st.mode == "tc"  # veth: tc is the faster choice there
    finally:
        st.destroy()
    # Not a veth, and no native XDP in its driver (loopback): auto must not pick XDP.
    steer_ns = lab.netns("steer")
    assert netns_call(steer_ns, loader.resolve_mode, "lo", "auto") == "xdp-native"
    assert netns_call(steer_ns, loader.native_xdp_supported, "lo") is False
    st = Steerer(unique_prefix(), "lo", namespace=steer_ns, mode="auto")
    try:
        assert st.mode == "tc"
    finally:
        st.destroy()


def test_a_sync_older_than_a_move_leaves_the_move_alone(steered: tuple[Lab, Steerer]) -> None:
    """A host's list of flows is a snapshot: a move that committed after it was taken
    must not be undone by it (the flow would go back to a host that let it go, and that
    host's kernel would answer the client with a RST). A change older than the list (and
    the margin) is the list's to correct."""
    lab, st = steered
    flow = Flow.parse(f"{lab.plan.address('client')}:41777-{lab.plan.vip_v4}:{PORT}")
    st.to(flow, "b")  # the move to b, just committed
    now = time.monotonic()
    # a's list, taken 0.5 s before the move, arrives after it: left alone.
    assert st.sync("a", [flow], 30.0, taken=now - 0.5)["steered"] == []
    assert st.get(flow).host == st.hosts["b"].id
    # The same without an age (an agent of before): the grace still covers a fresh move.
    assert st.sync("a", [flow], 30.0)["steered"] == []
    # b's list, taken before the import, does not list it: not removed as stale either.
    assert st.sync("b", [], 30.0, taken=now - 0.5)["removed"] == []
    assert st.get(flow).host == st.hosts["b"].id
    # A list taken well after the change does correct it: a serves the flow, so it is a's.
    st._touched[flow] = now - 10  # the move was long ago
    assert st.sync("a", [flow], 30.0, taken=now)["steered"] == [str(flow)]
    assert st.get(flow).host == st.hosts["a"].id
    st.forget(flow)


def test_a_park_whose_lease_runs_out_goes_where_the_store_says(
    steered: tuple[Lab, Steerer],
) -> None:
    """A migration's park that no claim reached (its claim committed at another steering
    node): when its lease runs out, the flow goes to the host the shared store names, not
    back to where it went before; without an override, it goes back."""
    lab, st = steered
    vip = str(lab.plan.vip(4))
    client = str(lab.plan.address("client", 4))
    moved = Flow.parse(f"{client}:42001-{vip}:443")
    other = Flow.parse(f"{client}:42002-{vip}:443")
    for i, flow in enumerate((moved, other)):
        st.park(flow, token=9000 + i, lease=0.3, owner="a")
    assert st.override(str(moved), "b") == "parked"  # the store says b; a move holds it
    time.sleep(0.4)
    st.gc()
    view = st.get(moved)
    assert view is not None and view.action.name == "TO" and st.items_by_host()[view.host] == "b"
    assert st.decision(moved, 9000)["decision"] == "aborted"  # here; another node committed
    assert st.get(other) is None  # no override: back to its route
