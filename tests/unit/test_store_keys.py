"""The shared store's key layout and value codec: what pysteer writes reads back, and
anything else in the store is refused with the key named, never used."""

from __future__ import annotations

import msgpack
import pytest

from pysteer.store.keys import (
    Override,
    StoreDataError,
    decode_override,
    override_key,
    overrides_prefix,
    prefix,
)

FLOW = "10.77.1.2:40000-10.77.100.1:443"
V6 = "[fd70::2]:40000-[fd70::64]:443"


def test_an_override_round_trips() -> None:
    for flow in (FLOW, V6):
        o = Override(flow, "b", "a")
        key = override_key("prod", flow)
        assert key == b"/pysteer/prod/overrides/" + flow.encode()
        assert decode_override("prod", key, o.encode(), 7) == Override(flow, "b", "a", 7)


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (b"/pysteer/other/overrides/" + FLOW.encode(), None, "not an override of cluster prod"),
        (b"/pysteer/prod/overrides/not-a-flow", None, "not a flow"),
        (b"/pysteer/prod/overrides/\xff", None, "not a flow"),
        (None, b"\xc1", "not msgpack"),
        (None, msgpack.packb([1, 2]), "not a map of host and by"),
        (None, msgpack.packb({"host": "b"}), "not a map of host and by"),
        (None, msgpack.packb({"host": "B!", "by": "a"}), "host is not a name"),
        (None, msgpack.packb({"host": "b", "by": 3}), "by is not a name"),
        (None, b"\x00" * 600, "at most 512"),
    ],
)
def test_garbage_in_the_store_is_refused(
    key: bytes | None, value: bytes | None, error: str
) -> None:
    with pytest.raises(StoreDataError, match=error):
        decode_override(
            "prod", key or override_key("prod", FLOW), value or Override(FLOW, "b", "a").encode(), 1
        )


def test_cluster_names_are_checked() -> None:
    assert overrides_prefix("lab") == b"/pysteer/lab/overrides/"
    for bad in ("", "Prod", "a/b", "x" * 64):
        with pytest.raises(ValueError):
            prefix(bad)
