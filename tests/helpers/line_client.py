"""A minimal unmodified client: stdin to the server, the server to stdout (like socat).

    python line_client.py HOST PORT [--tls CAFILE --name SNI]

Python's own ``ssl`` (OpenSSL underneath, no pysteer code) when ``--tls`` is given.
"""

import argparse
import os
import socket
import ssl
import sys
import threading


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--tls", metavar="CAFILE")
    p.add_argument("--name", default="vip")
    args = p.parse_args()
    sock = socket.create_connection((args.host, args.port))
    if args.tls:
        ctx = ssl.create_default_context(cafile=args.tls)
        sock = ctx.wrap_socket(sock, server_hostname=args.name)

    def upstream() -> None:
        while line := sys.stdin.buffer.readline():
            sock.sendall(line)

    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.buffer
    while chunk := sock.recv(65536):
        out.write(chunk)
        out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
