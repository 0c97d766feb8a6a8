"""The agent's sans-socket parts: frames, the timeline, the import ledger's outcomes."""

import asyncio

import msgpack
import pytest

from pysteer.agent.frames import MAX_FRAME, FrameError, encode_frame, read_frame
from pysteer.agent.timeline import Timeline
from pysteer.transfer import BlobError, ImportLedger


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def frames(data: bytes) -> list[dict]:
    reader, out = feed(data), []
    while True:
        try:
            out.append(await read_frame(reader))
        except FrameError as exc:
            if "hung up" in str(exc):
                return out
            raise


def test_frames_round_trip_binary() -> None:
    messages = [{"op": "prepare", "id": bytes(range(16)), "blob": b"\0\n\xff" * 1000},
                {"op": "hello"}]  # fmt: skip
    data = b"".join(encode_frame(m) for m in messages)
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
    with pytest.raises(FrameError, match=message):
        asyncio.run(frames(data))


def test_frame_is_msgpack_with_length() -> None:
    frame = encode_frame({"a": 1})
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
    ledger = ImportLedger(limit=2)
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    ledger.claim(a)
    assert ledger.outcome(a) == "prepared"
    with pytest.raises(BlobError, match="already imported"):
        ledger.claim(a)
    ledger.decide(a, "committed")
    assert ledger.outcome(a) == "committed"
    ledger.claim(b)
    ledger.claim(c)  # over the limit: the oldest id is forgotten (stale blobs are refused)
    assert ledger.outcome(a) is None and ledger.outcome(c) == "prepared"
    with pytest.raises(ValueError, match="unknown outcome"):
        ledger.decide(b, "maybe")
