"""Unmodified backends on the lab's hosts: Debian's nginx on 127.0.0.1 of each host's
namespace, for a ``proxy`` service (the demo, the tests and the proxy benchmark).

Each host gets its own nginx (its own config, logs and pid file under ``directory``),
serving the same static files, with an access log that says which connection asked
what, and an ``X-Backend`` header naming the host, so a client can see which host's
backend answered each request. ``/slow/`` serves the same files at a limited rate (a
response that takes a while), ``/app/`` is proxied to a second backend on each host
(a WSGI server in the tests).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pysteer.lab.procs import accepts, stop_process

if TYPE_CHECKING:
    from pysteer.lab.topology import Lab

NGINX = "/usr/sbin/nginx"
FILES = {"1k.bin": 1024, "64k.bin": 64 * 1024, "1m.bin": 1 << 20, "20m.bin": 20 << 20}
LOG_FORMAT = (
    "$remote_addr $connection $connection_requests $request_method $request_uri "
    '$status $body_bytes_sent $request_length "$http_x_forwarded_for"'
)


class BackendError(RuntimeError):
    """A backend could not be started; the message has its error log."""


def file_bytes(name: str) -> bytes:
    """The deterministic content of static file ``name``."""
    return random.Random(name).randbytes(FILES[name])  # noqa: S311 - test data, not secrets


def file_sha256(name: str) -> str:
    return hashlib.sha256(file_bytes(name)).hexdigest()


def nginx_conf(
    directory: Path,
    host: str,
    *,
    port: int,
    www: Path,
    proxy_protocol_port: int | None,
    app_port: int | None,
    extra_servers: str = "",
) -> str:
    """One host's nginx.conf: everything under ``directory``, nothing of /etc/nginx's.
    ``proxy_protocol_port``: a second listener that expects a PROXY header and logs the
    client address it names."""
    listen = f"listen 127.0.0.1:{port};"
    real_ip = ""
    if proxy_protocol_port:
        listen += f"\n        listen 127.0.0.1:{proxy_protocol_port} proxy_protocol;"
        real_ip = "set_real_ip_from 127.0.0.1;\n        real_ip_header proxy_protocol;"
    app = (
        f"""location /app/ {{
            proxy_pass http://127.0.0.1:{app_port}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 120s;
            proxy_request_buffering off;
        }}"""
        if app_port
        else ""
    )
    return f"""# Written by pysteer.lab.backends for host {host}
daemon off;
user root;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    types {{ application/octet-stream bin; text/plain txt; }}
    default_type application/octet-stream;
    log_format pysteer '{LOG_FORMAT}';
    access_log {directory}/access.log pysteer;
    client_body_temp_path {directory}/spool/body;
    proxy_temp_path {directory}/spool/proxy;
    fastcgi_temp_path {directory}/spool/fastcgi;
    uwsgi_temp_path {directory}/spool/uwsgi;
    scgi_temp_path {directory}/spool/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    sendfile on;
    server {{
        {listen}
        {real_ip}
        root {www};
        add_header X-Backend {host} always;
        location /slow/ {{
            alias {www}/;
            limit_rate 2m;
        }}
        {app}
    }}
{extra_servers}
}}
"""


@dataclass
class Nginx:
    """nginx on every host of ``lab``, on 127.0.0.1:``port`` of each host's namespace."""

    lab: Lab
    directory: Path
    port: int = 8080
    proxy_protocol_port: int | None = None  # another listener, behind PROXY v2
    app_port: int | None = None  # /app/ goes to 127.0.0.1:app_port when set
    extra_servers: dict[str, str] = field(default_factory=dict)  # host -> more server{}s
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def www(self) -> Path:
        return self.directory / "www"

    def _files(self) -> None:
        self.www.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            path = self.www / name
            if not path.exists():
                path.write_bytes(file_bytes(name))

    def host_dir(self, host: str) -> Path:
        return self.directory / f"nginx-{host}"

    def start(self, host: str) -> None:
        """Start (or restart) the host's nginx and wait until it accepts connections."""
        if shutil.which(NGINX) is None and not Path(NGINX).exists():
            raise BackendError("nginx is not installed (scripts/setup installs it)")
        self._files()
        d = self.host_dir(host)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "spool" / sub).mkdir(parents=True, exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(
            nginx_conf(
                d,
                host,
                port=self.port,
                www=self.www,
                proxy_protocol_port=self.proxy_protocol_port,
                app_port=self.app_port,
                extra_servers=self.extra_servers.get(host, ""),
            )
        )
        self.stop(host)
        proc = self.lab.popen(
            host,
            [NGINX, "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[host] = proc
        deadline = time.monotonic() + 15
        while not self.lab.call(host, accepts, ("127.0.0.1", self.port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(host)
                log = (d / "error.log").read_text() if (d / "error.log").exists() else ""
                raise BackendError(f"nginx on {host} did not start:\n{log[-2000:]}")
            time.sleep(0.05)

    def stop(self, host: str) -> None:
        proc = self.procs.pop(host, None)
        if proc is not None:
            stop_process(proc, 10)  # SIGTERM: nginx's fast shutdown, master and workers

    def start_all(self) -> Nginx:
        for host in self.lab.plan.hosts:
            self.start(host)
        return self

    def close(self) -> None:
        for host in list(self.procs):
            self.stop(host)

    def access_log(self, host: str) -> list[dict[str, str]]:
        """The host's access log, a dict per request (see LOG_FORMAT)."""
        path = self.host_dir(host) / "access.log"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            head, _, xff = line.partition(' "')
            parts = head.split()
            if len(parts) != 8:
                continue
            keys = ("client", "connection", "n", "method", "uri", "status", "bytes", "length")
            rows.append(dict(zip(keys, parts, strict=True)) | {"xff": xff.rstrip('"')})
        return rows
