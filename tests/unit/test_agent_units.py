"""The agent's sans-socket parts: frames as its RPC reads them, the timeline, the import
ledger's outcomes."""

import asyncio
import contextlib
import time

import msgpack
import pytest

from pysteer.agent.ledger import Ledger, LedgerError
from pysteer.migration.timeline import Timeline
from pysteer.rpc.aio import Connection
from pysteer.rpc.codec import MAX_FRAME, encode
from pysteer.rpc.errors import ProtocolError


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def frames(data: bytes) -> list[dict]:
    """Every message in ``data``, read as the agent reads a peer, until it hangs up."""
    conn, out = Connection(feed(data), None), []  # type: ignore[arg-type] - reads only
    while True:
        try:
            message = await conn.receive()
        except ProtocolError as exc:
            if "hung up" in str(exc):
                return out
            raise
        if message is None:
            return out
        out.append(message)


def test_frames_round_trip_binary() -> None:
    messages = [
        {"op": "prepare", "id": bytes(range(16)), "blob": b"\0\n\xff" * 1000},
        {"op": "hello"},
    ]
    data = b"".join(encode(m) for m in messages)
    assert asyncio.run(frames(data)) == messages
    assert asyncio.run(frames(data[:-1])) == messages[:1]  # a cut frame is a hang-up


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ((MAX_FRAME + 1).to_bytes(4, "big"), "over the"),
        (b"\0\0\0\1\xc1", "invalid msgpack"),
        (b"\0\0\0\1\x01", "must hold a map"),
    ],
)
def test_bad_frames(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        asyncio.run(frames(data))


def test_frame_is_msgpack_with_length() -> None:
    frame = encode({"a": 1})
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"a": 1}


def test_timeline_spans() -> None:
    tl = Timeline()
    tl.step("park")
    tl.step("steered", replayed=3)
    steps = tl.to_json()
    assert [s["step"] for s in steps] == ["park", "steered"]
    assert steps[1]["replayed"] == 3 and steps[1]["ms"] >= steps[0]["ms"]
    assert tl.span("park", "steered") == pytest.approx(steps[1]["ms"] - steps[0]["ms"], abs=0.002)
    assert tl.span("park", "missing") is None


def test_ledger_outcomes() -> None:
    ledger = Ledger(limit=2)  # memory only
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    now = time.time()
    ledger.claim(a, sealed_at=now)
    assert ledger.outcome(a) == "prepared"
    with pytest.raises(LedgerError, match="already imported"):
        ledger.claim(a, sealed_at=now)
    ledger.decide(a, "committed")
    assert ledger.outcome(a) == "committed"
    ledger.claim(b, sealed_at=now)
    ledger.claim(c, sealed_at=now)  # over the limit: the oldest goes (stale blobs are refused)
    assert ledger.outcome(a) is None and ledger.outcome(c) == "prepared"
    with pytest.raises(ValueError, match="unknown outcome"):
        ledger.decide(b, "maybe")


def test_stopping_ends_a_task_that_lost_its_cancel() -> None:
    """Python 3.11's ``wait_for`` drops a cancel that arrives in the same turn as its
    result, so a ``while True`` loop around it runs on; ``asyncio.run`` cancels once and
    then waits for it forever (an agent took longer than 15 s to stop). ``_end_tasks``
    cancels until the task is gone, and gives up, loudly, after its timeout."""
    from types import SimpleNamespace  # noqa: PLC0415

    from pysteer.agent.agent import Agent  # noqa: PLC0415

    async def scenario() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future] = []

        async def heartbeat() -> None:
            while True:
                futures.append(loop.create_future())
                await asyncio.wait_for(futures[-1], 5)

        task = loop.create_task(heartbeat())
        await asyncio.sleep(0)
        futures[-1].set_result(None)  # the answer and the cancel in one turn
        task.cancel()
        await asyncio.sleep(0.05)
        lost = not task.done()  # the cancel was dropped: the loop runs on
        fake = SimpleNamespace(_tasks={task})
        task.add_done_callback(fake._tasks.discard)
        await Agent._end_tasks(fake, timeout=2.0)

        deaf = True

        async def stubborn() -> None:  # ignores cancels while ``deaf``: bounded, no hang
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if not deaf:
                        raise

        stuck = loop.create_task(stubborn())
        fake2 = SimpleNamespace(_tasks={stuck})
        t0 = loop.time()
        await Agent._end_tasks(fake2, timeout=0.3)
        bounded = loop.time() - t0 < 1.0
        deaf = False
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stuck
        return lost, task.done(), bounded

    lost, ended, bounded = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert (lost, ended, bounded) == (True, True, True)
