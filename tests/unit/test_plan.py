"""The address plan: every address derived from two private bases, bad bases refused."""

import ipaddress
from pathlib import Path

import pytest

from pysteer.lab import plan


def test_default_plan_addresses() -> None:
    p = plan.load()
    assert p.nodes == ("client", "steer", "a", "b")
    assert p.default_host == "a"
    assert str(p.vip_v4) == "10.77.100.1"
    assert str(p.vip_v6) == "fd70:7374:6565:64::1"
    client = p.link("client")
    assert (str(client.steer_end.v4), str(client.peer_end.v4)) == ("10.77.1.1/24", "10.77.1.2/24")
    assert str(p.link("b").peer_end.v6) == "fd70:7374:6565:3::2/64"
    assert (client.steer_end.name, client.peer_end.name) == ("to-client", "to-steer")
    assert str(p.address("steer")) == "10.77.1.1"
    assert str(p.address("a", 6)) == "fd70:7374:6565:2::2"


def test_every_address_is_inside_the_bases() -> None:
    p = plan.load(v4="192.168.0.0/16", v6="fd00:1:2::/48")
    addrs = [p.vip_v4, p.vip_v6]
    for link in p.links:
        for end in (link.steer_end, link.peer_end):
            addrs += [end.v4.ip, end.v6.ip]
    assert len(set(addrs)) == len(addrs)
    for a in addrs:
        assert a in (p.v4 if a.version == 4 else p.v6)


def test_round_trip_through_state_dict() -> None:
    p = plan.load(v4="10.9.0.0/16", v6="fd09::/48")
    assert plan.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    ("v4", "v6", "message"),
    [
        ("8.8.0.0/16", None, "not private"),
        ("10.77.0.0/24", None, "must be a /16"),
        ("10.77.0.1/16", None, "not a network"),
        (None, "2001:db8::/48", "not a ULA"),
        (None, "fd00::/64", "must be a /48"),
        (None, "nonsense", "not a network"),
    ],
)
def test_bad_bases_are_refused(v4: str | None, v6: str | None, message: str) -> None:
    with pytest.raises(plan.PlanError, match=message):
        plan.load(v4=v4, v6=v6)


def test_unknown_variant() -> None:
    with pytest.raises(plan.PlanError, match="no plan variant 'nope'; known: lab, vm"):
        plan.load("nope")


def test_bad_layouts(tmp_path) -> None:
    layout = plan.load_document()["layout"]
    with pytest.raises(plan.PlanError, match="default host 'c'"):
        plan.build({**layout, "default_host": "c"}, "10.1.0.0/16", "fd01::/48")
    with pytest.raises(plan.PlanError, match="distinct"):
        plan.build({**layout, "vip_subnet": 1}, "10.1.0.0/16", "fd01::/48")
    with pytest.raises(plan.PlanError, match="link the steering node"):
        plan.build({**layout, "links": {"client": 1, "a": 2}}, "10.1.0.0/16", "fd01::/48")
    with pytest.raises(plan.PlanError, match="malformed plan layout"):
        plan.build({"client": "client"}, "10.1.0.0/16", "fd01::/48")
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(plan.PlanError, match="not valid JSON"):
        plan.load(path=bad)
    with pytest.raises(plan.PlanError, match="cannot read plan"):
        plan.load(path=tmp_path / "missing.json")


def test_plan_file_is_the_only_source_of_addresses() -> None:
    """No module repeats an address of the plan: they all come from plan.json."""
    p = plan.load()
    literals = {str(p.vip_v4), str(p.v4.network_address), "fd70:7374:6565"}
    root = Path(plan.__file__).resolve().parents[1]
    for source in root.rglob("*.py"):
        text = source.read_text()
        for literal in literals:
            assert literal not in text, f"{source} repeats {literal} from plan.json"
    assert ipaddress.ip_address(str(p.vip_v4)).is_private
