"""The cluster TOML file: a good one loads, each kind of mistake names its key."""

from pathlib import Path

import pytest

from pysteer.cluster import ConfigError, load_config
from pysteer.lab.cluster import write_plan_cluster
from pysteer.lab.plan import load as load_plan

GOOD = """
[cluster]
vip = ["10.0.0.100", "fd00::64"]
ca = "certs/ca.pem"
key = "/etc/pysteer/cluster.key"

[services.443]
app = "ticker"
tls = true
cert = "certs/vip.pem"
key = "certs/vip.key"

[services.80]
app = "http"

[steer]
name = "lb"
control = "10.0.1.1:7700"
cert = "certs/lb.pem"
key = "certs/lb.key"

[nodes.a]
control = "10.0.2.2:7701"
cert = "certs/a.pem"
key = "certs/a.key"

[nodes.b]
control = "[fd00::3]:7701"
cert = "certs/b.pem"
key = "certs/b.key"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_good_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert [str(v) for v in cfg.vips] == ["10.0.0.100", "fd00::64"]
    assert cfg.ca == tmp_path / "certs/ca.pem"
    assert cfg.cluster_key == Path("/etc/pysteer/cluster.key")
    assert cfg.services[443].app == "ticker" and cfg.services[443].tls
    assert cfg.services[443].cert == tmp_path / "certs/vip.pem"
    assert not cfg.services[80].tls
    assert cfg.steer.name == "lb" and cfg.steer.control == ("10.0.1.1", 7700)
    assert cfg.node("b").control == ("fd00::3", 7701)
    with pytest.raises(ConfigError, match=r"unknown node 'c' \(nodes: a, b\)"):
        cfg.node("c")


def test_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSTEER_CONFIG", str(write(tmp_path, GOOD)))
    assert load_config().steer.name == "lb"
    monkeypatch.delenv("PYSTEER_CONFIG")
    with pytest.raises(ConfigError, match="give --config or set PYSTEER_CONFIG"):
        load_config()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('vip = ["10.0.0.100", "fd00::64"]', 'vip = "nope"'), "cluster.vip"),
        (("[services.443]", "[services.https]"), "the key must be a port"),
        (("tls = true", 'tls = "yes"'), "services.443.tls must be true or false"),
        (
            ('control = "10.0.2.2:7701"', 'control = "a.example:7701"'),
            "nodes.a.control must be ADDRESS:PORT",
        ),
        (
            ('control = "10.0.1.1:7700"', 'control = "10.0.1.1:99999"'),
            "steer.control must be ADDRESS:PORT",
        ),
        (('cert = "certs/a.pem"', 'cert = ""'), "nodes.a.cert must be a non-empty string"),
        (("[nodes.b]", "[nodes.B_x]"), "invalid node name 'B_x'"),
        (('name = "lb"', 'name = "a"'), "steering node 'a' is also listed"),
        (('key = "certs/a.key"', 'key = "certs/a.key"\nport = 1'), "unknown key(s): port"),
        (("[cluster]", "[clusters]"), "[cluster] is missing"),
        (('cert = "certs/vip.pem"\n', ""), "services.443.cert must be a non-empty string"),
        (('app = "ticker"', 'app = "ticker"\nkind = 1'), "[services.443] has unknown key(s): kind"),
        (('app = "ticker"', "app = ticker"), "not valid TOML"),
        (('app = "ticker"', 'app = "proxy"'), 'services.443.backend is needed with app = "proxy"'),
        (('app = "ticker"', 'app = "ticker"\nbackend = "127.0.0.1:80"'), "only go with app"),
        (('app = "ticker"', 'app = "proxy"\nbackend = "web:80"'), "'web' is not an IP address"),
        (('app = "ticker"', 'app = "proxy"\nbackend = 80'), "services.443.backend must be a"),
        (
            ('app = "ticker"', 'app = "proxy"\nbackend = "127.0.0.1:80"\nproxy_protocol = "v1"'),
            'services.443: proxy_protocol must be "v2"',
        ),
    ],
)
def test_mistakes_name_their_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = GOOD.replace(*change, 1)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_where_a_node_is(tmp_path: Path) -> None:
    """``netns`` and ``remote`` say where TCP to a node may go; neither is the default."""
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.node("a").netns is None and not cfg.node("a").remote
    assert cfg.steer.netns is None and not cfg.steer.remote
    text = GOOD.replace('key = "certs/a.key"', 'key = "certs/a.key"\nnetns = "lab-a"')
    text = text.replace('key = "certs/b.key"', 'key = "certs/b.key"\nremote = true')
    text = text.replace('key = "certs/lb.key"', 'key = "certs/lb.key"\nnetns = "lab-steer"')
    cfg = load_config(write(tmp_path, text))
    assert (cfg.node("a").netns, cfg.node("a").remote) == ("lab-a", False)
    assert (cfg.node("b").netns, cfg.node("b").remote) == (None, True)
    assert cfg.steer.netns == "lab-steer"


@pytest.mark.parametrize(
    ("extra", "node", "message"),
    [
        ('netns = ""', "a", "nodes.a.netns must be a non-empty string"),
        ("netns = 7", "a", "nodes.a.netns must be a non-empty string"),
        ('netns = "x/y"', "a", "nodes.a.netns: invalid namespace name 'x/y'"),
        ('netns = ".."', "b", "nodes.b.netns: invalid namespace name '..'"),
        ('remote = "yes"', "b", "nodes.b.remote must be true or false"),
        ("remote = 1", "lb", "steer.remote must be true or false"),
        ('netns = "lab-a"\nremote = true', "a", "[nodes.a] has both netns and remote"),
        ('netns = "s"\nremote = true', "lb", "[steer] has both netns and remote"),
    ],
)
def test_bad_netns_or_remote(tmp_path: Path, extra: str, node: str, message: str) -> None:
    text = GOOD.replace(f'key = "certs/{node}.key"', f'key = "certs/{node}.key"\n{extra}', 1)
    assert text != GOOD
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


def test_workers(tmp_path: Path) -> None:
    """``workers = N``: worker I of a node listens for peers on its control port + I."""
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.node("a").workers == 1 and cfg.steer.workers == 1
    text = GOOD.replace('key = "certs/a.key"', 'key = "certs/a.key"\nworkers = 4', 1)
    a = load_config(write(tmp_path, text)).node("a")
    assert a.workers == 4
    assert [a.worker_control(i) for i in range(4)] == [("10.0.2.2", 7701 + i) for i in range(4)]


@pytest.mark.parametrize(
    ("node", "extra", "message"),
    [
        ("a", "workers = 0", "nodes.a.workers must be an integer in [1, 64]"),
        ("a", "workers = 65", "nodes.a.workers must be an integer in [1, 64]"),
        ("a", "workers = true", "nodes.a.workers must be an integer in [1, 64]"),
        ("a", 'workers = "2"', "nodes.a.workers must be an integer in [1, 64]"),
        ("a", "workers = 2.0", "nodes.a.workers must be an integer in [1, 64]"),
        ("lb", "workers = 2", "steer.workers: the steering daemon runs as one process"),
    ],
)
def test_bad_workers(tmp_path: Path, node: str, extra: str, message: str) -> None:
    text = GOOD.replace(f'key = "certs/{node}.key"', f'key = "certs/{node}.key"\n{extra}', 1)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value) == message


def test_workers_ports_must_not_overlap(tmp_path: Path) -> None:
    """Two nodes on one address (one machine, or a typo): a's second worker would take b's
    port. Ports past 65535 are refused too."""
    text = GOOD.replace('control = "[fd00::3]:7701"', 'control = "10.0.2.2:7702"')
    load_config(write(tmp_path, text))  # one worker each: no overlap
    crowded = text.replace('key = "certs/a.key"', 'key = "certs/a.key"\nworkers = 2', 1)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, crowded))
    assert str(info.value) == (
        "nodes a and b both listen on 10.0.2.2:7702 (a node with workers = N takes its "
        "control port and the N - 1 after it)"
    )
    high = GOOD.replace('"10.0.2.2:7701"', '"10.0.2.2:65535"')
    high = high.replace('key = "certs/a.key"', 'key = "certs/a.key"\nworkers = 2', 1)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, high))
    assert str(info.value) == "nodes.a: its 2 workers would listen on ports up to 65536"


@pytest.mark.parametrize("variant", ["lab", "vm"])
def test_plan_cluster_says_where_each_node_is(tmp_path: Path, variant: str) -> None:
    """The lab's file names each node's namespace; the VMs' file marks every node remote."""
    plan = load_plan(variant)
    cfg = load_config(write_plan_cluster(plan, "tq", tmp_path, remote=variant == "vm"))
    for node in (cfg.steer, *cfg.nodes.values()):
        if variant == "vm":
            assert node.remote and node.netns is None, node
        else:
            assert not node.remote and node.netns == f"tq-{node.name}", node
    assert sorted(cfg.nodes) == sorted(plan.hosts) and cfg.steer.name == plan.steer


def test_a_proxy_service(tmp_path: Path) -> None:
    text = GOOD.replace(
        'app = "ticker"',
        'app = "proxy"\nbackend = "[::1]:8080"\nprotocol = "tcp"\nidle_ms = 250\n'
        'proxy_protocol = "v2"',
        1,
    )
    proxy = load_config(write(tmp_path, text)).services[443].proxy
    assert proxy is not None
    assert (proxy.backend, proxy.protocol, proxy.idle_ms, proxy.proxy_protocol) == (
        ("::1", 8080),
        "tcp",
        250,
        True,
    )
    assert load_config(write(tmp_path, GOOD)).services[443].proxy is None
