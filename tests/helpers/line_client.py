"""A minimal unmodified client: stdin to the server, the server to stdout (like socat).

    python line_client.py HOST PORT [--tls CAFILE --name SNI]

Python's own ``ssl`` (OpenSSL underneath, no pysteer code) when ``--tls`` is given. One
asyncio loop does all of the connection's I/O: OpenSSL must never see a read and a write
of one connection from two threads at once (a blocking ``ssl`` socket shared by a reader
and a writer thread gets spurious EOFs and bad record MACs).
"""

import argparse
import asyncio
import ssl
import sys

LINE_LIMIT = 1 << 20  # longest stdin line forwarded in one piece


async def upstream(stdin: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Every stdin line to the server as it comes (stdin's EOF does not close the stream)."""
    while line := await stdin.readline():
        writer.write(line)
        await writer.drain()


async def downstream(reader: asyncio.StreamReader) -> None:
    """Everything from the server to stdout until it closes."""
    out = sys.stdout.buffer
    while chunk := await reader.read(65536):
        out.write(chunk)
        out.flush()


async def run(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=args.tls) if args.tls else None
    reader, writer = await asyncio.open_connection(
        args.host, args.port, ssl=ctx, server_hostname=args.name if ctx else None
    )
    stdin = asyncio.StreamReader(limit=LINE_LIMIT)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
    async with asyncio.TaskGroup() as group:  # a failed upstream ends the client too
        sending = group.create_task(upstream(stdin, writer))
        await downstream(reader)
        sending.cancel()
    writer.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--tls", metavar="CAFILE")
    p.add_argument("--name", default="vip")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
