"""The ticker stream check: every whole line is judged; only a last line cut off when
the client was ended (no newline yet) is left out."""

from __future__ import annotations

import pytest

from pysteer.lab.clients import StreamError, check_ticker_stream

SENT = [b"one\n", b"two\n"]
WHOLE = "ticker ready\ntick 1\necho 1 one\ntick 2\necho 2 two\ntick 3\n"


def test_a_whole_stream_passes() -> None:
    assert check_ticker_stream(WHOLE, SENT) == 3


def test_a_last_line_cut_by_the_end_of_the_client_is_left_out() -> None:
    assert check_ticker_stream(WHOLE + "t", SENT) == 3
    assert check_ticker_stream(WHOLE + "tick 4", SENT) == 3  # unterminated: not yet judged


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (WHOLE.replace("tick 2\n", "t\n"), "unexpected line 't'"),  # cut in the middle
        (WHOLE.replace("tick 2\n", ""), "ticks lost"),
        ("ticker ready\ntick 1\necho 1 one\necho 2 t", "echoes lost"),  # the last echo cut
        (WHOLE + "ticker ready\n", "greeted twice"),
    ],
)
def test_anything_else_still_fails(text: str, why: str) -> None:
    with pytest.raises(StreamError, match=why):
        check_ticker_stream(text, SENT)
