"""A sealed-blob builder shared by the unit and the agent security tests."""

import os

from pysteer.flow import Flow
from pysteer.tcp import RepairWindow, SocketOptions, TcpState, TcpStateCode
from pysteer.transfer import MigrationBlob, new_migration_id

SECRET = os.urandom(32)
RECV = b"received but unread: a marker long enough never to occur by chance"


def blob(mid: bytes | None = None, flow: str = "10.0.0.2:51000-10.0.0.100:443") -> MigrationBlob:
    tcp = TcpState(
        family=4,
        local=("10.0.0.100", 443),
        peer=("10.0.0.2", 51000),
        state=TcpStateCode.ESTABLISHED,
        send_seq=10,
        recv_seq=20,
        recv_queue=RECV,
        send_unacked=b"",
        send_unsent=b"",
        mss_clamp=1460,
        sack=True,
        timestamps=False,
        wscale=None,
        timestamp=None,
        window=RepairWindow(20, 100, 100, 100, 20),
        options=SocketOptions(),
    )
    tls = {
        "v": 1,
        "version": "TLSv1.3",
        "suite": "TLS_AES_128_GCM_SHA256",
        "read": {"secret": SECRET, "seq": 0},
        "write": {"secret": os.urandom(32), "seq": 2},
        "rx": b"",
        "hs": b"",
        "close_sent": False,
        "close_received": False,
        "written": 0,
        "sni": None,
        "alpn": None,
        "resumed": False,
        "peer_chain": [],
    }
    return MigrationBlob(
        mid or new_migration_id(),
        Flow.parse(flow),
        tcp,
        tls,
        {"counter": 7},
    )
