"""No test helper, benchmark or lab module shares a TLS socket between threads.

OpenSSL does not allow an SSL_read and an SSL_write on one connection at once: a blocking
``ssl.SSLSocket`` read by one thread while another wrote gave the migrate benchmark a
segfault and a bad record MAC. Full-duplex clients use asyncio (``open_connection(ssl=)``)
or one thread. Two checks on the AST, heuristic but aimed at exactly that pattern:

- a module that makes an ``SSLSocket`` (``wrap_socket``) starts no thread at all;
- a socket (``self.x``, or a function's local) that one thread does I/O on gets no I/O
  from another thread (the caller's, or a second target), unless the class or function
  refuses an ``ssl.SSLSocket``: plain TCP may be read and written at once.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCOPE = ["tests/helpers", "scripts/bench", "pysteer/lab"]
SOCKET_IO = {"send", "sendall", "recv", "recv_into", "sendfile", "do_handshake", "unwrap"}
THREAD_BASES = {"Thread", "threading.Thread"}
SIMPLE = ast.Expr | ast.Assign | ast.AnnAssign | ast.AugAssign | ast.Return
FUNCTION = ast.FunctionDef | ast.AsyncFunctionDef


def checked_files() -> list[Path]:
    """Python files in scope, scripts without a ``.py`` suffix included."""
    found = []
    for folder in SCOPE:
        for path in sorted((ROOT / folder).iterdir()):
            script = not path.suffix and path.read_text(errors="replace").startswith(
                "#!/usr/bin/env python"
            )
            if path.is_file() and (path.suffix == ".py" or script):
                found.append(path)
    return found


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _starts_thread(node: ast.AST) -> bool:
    """A simple statement that makes a ``Thread``: its target runs elsewhere."""
    return isinstance(node, SIMPLE) and any(
        isinstance(c, ast.Call) and _name(c) == "Thread" for c in ast.walk(node)
    )


def _walk(node: ast.AST, *, skip_thread_starts: bool = False) -> Iterator[ast.AST]:
    todo = [node]
    while todo:
        here = todo.pop()
        if not (skip_thread_starts and _starts_thread(here)):
            yield here
            todo.extend(ast.iter_child_nodes(here))


def _calls(node: ast.AST, *, skip_thread_starts: bool = False) -> Iterator[ast.Call]:
    walk = _walk(node, skip_thread_starts=skip_thread_starts)
    return (n for n in walk if isinstance(n, ast.Call))


def _self_attributes(node: ast.AST, *, skip_thread_starts: bool = False) -> set[str]:
    return {
        n.attr
        for n in _walk(node, skip_thread_starts=skip_thread_starts)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


def _io_receivers(nodes: Iterable[ast.AST]) -> set[str]:
    """``x`` of every ``x.send(...)``, ``x.recv(...)``... (not inside thread starts)."""
    return {
        ast.unparse(c.func.value)
        for node in nodes
        for c in _calls(node, skip_thread_starts=True)
        if isinstance(c.func, ast.Attribute) and c.func.attr in SOCKET_IO
    }


def _refuses_ssl_socket(node: ast.AST) -> bool:
    return any(_name(c) == "isinstance" and "SSLSocket" in ast.unparse(c) for c in _calls(node))


def _shared(sides: list[set[str]]) -> list[str]:
    return sorted({r for side in sides for r in side if sum(r in s for s in sides) > 1})


def _class_problems(cls: ast.ClassDef) -> list[str]:
    """Each thread's methods (a target or a Thread subclass's ``run``, and what it calls)
    and the caller's (what the other methods call): a ``self.x`` with socket I/O on two."""
    methods = {f.name: f for f in cls.body if isinstance(f, FUNCTION)}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in methods and name not in seen:
                seen.add(name)
                todo += _self_attributes(methods[name], skip_thread_starts=True)
        return seen

    entries = {"run"} if any(ast.unparse(b) in THREAD_BASES for b in cls.bases) else set()
    for stmt in (s for m in methods.values() for s in ast.walk(m) if _starts_thread(s)):
        # target=self.m, target=self._guard(self.m), target=f for f in (self.a, self.b)
        entries |= _self_attributes(stmt) & set(methods)
    sides = [reach(e) for e in sorted(entries)]
    in_threads = set().union(*sides)
    sides.append(set().union(*(reach(m) for m in methods if m not in in_threads)))
    receivers = [_io_receivers(methods[m] for m in side) for side in sides]
    shared = [r for r in _shared(receivers) if r.startswith("self.")]
    if len(sides) > 1 and shared and not _refuses_ssl_socket(cls):
        return [f"class {cls.name}: {', '.join(shared)} has socket I/O in two threads"]
    return []


def _function_problems(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Nested functions run as threads, and the enclosing body: a local with socket I/O in
    two of them."""
    nested = {n.name: n for n in fn.body if isinstance(n, FUNCTION)}
    entries = {
        kw.value.id
        for c in _calls(fn)
        if _name(c) == "Thread"
        for kw in c.keywords
        if kw.arg == "target" and isinstance(kw.value, ast.Name) and kw.value.id in nested
    }
    if not entries:
        return []
    own = [s for s in fn.body if not isinstance(s, FUNCTION)]
    shared = _shared([_io_receivers([nested[e]]) for e in sorted(entries)] + [_io_receivers(own)])
    if shared and not _refuses_ssl_socket(fn):
        return [f"function {fn.name}: {', '.join(shared)} has socket I/O in two threads"]
    return []


def problems(source: str) -> list[str]:
    """Where a module's source shares, or may share, an SSL socket between threads."""
    tree = ast.parse(source)
    found = []
    wraps = any(_name(c) == "wrap_socket" for c in _calls(tree))
    threads = any(_name(c) in {"Thread", "ThreadPoolExecutor"} for c in _calls(tree)) or any(
        isinstance(c, ast.ClassDef) and any(ast.unparse(b) in THREAD_BASES for b in c.bases)
        for c in ast.walk(tree)
    )
    if wraps and threads:
        found.append("makes an SSLSocket (wrap_socket) and starts threads")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found += _class_problems(node)
        elif isinstance(node, FUNCTION):
            found += _function_problems(node)
    return found


def test_scope_is_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in checked_files()}
    assert {
        "tests/helpers/line_client.py",
        "tests/helpers/migration.py",
        "scripts/bench/migrate.py",
        "scripts/bench/drain.py",
        "pysteer/lab/clients.py",
        "pysteer/lab/demo.py",
    } <= names


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_ssl_socket_shared_between_threads(path: Path) -> None:
    assert problems(path.read_text()) == []


# Each pattern this check exists for, as the helpers and the benchmark had them.
BAD = {
    "line client": """
        def main():
            sock = ctx.wrap_socket(socket.create_connection(addr), server_hostname="vip")
            def upstream():
                while line := sys.stdin.buffer.readline():
                    sock.sendall(line)
            threading.Thread(target=upstream, daemon=True).start()
            while chunk := sock.recv(65536):
                out.write(chunk)
        """,
    "reader and writer threads": """
        class Client:
            def __init__(self, raw):
                self.sock = raw
                self.threads = [threading.Thread(target=f) for f in (self._read, self._write)]
            def _write(self):
                self.sock.sendall(b"1\\n")
            def _read(self):
                self._consume(self.sock.recv(100))
            def _consume(self, data):
                pass
        """,
    "wrapped targets, no refusal": """
        class Client:
            def __init__(self, sock):
                self.sock = sock
                self.writer = threading.Thread(target=self._guard(self._write))
                self.reader = threading.Thread(target=self._guard(self._read))
            def _guard(self, fn):
                return fn
            def _write(self):
                self.sock.sendall(b"x")
            def _read(self):
                self.sock.recv(1)
        """,
    "thread reads, caller writes": """
        class Reader(threading.Thread):
            def run(self):
                self._loop()
            def _loop(self):
                self.sock.recv(100)
            def say(self, data):
                self.sock.sendall(data)
        """,
    "wrap_socket in a threaded module": """
        tls = ctx.wrap_socket(raw, server_hostname="vip")
        worker = threading.Thread(target=serve, args=(tls,))
        """,
}

GOOD = {
    "one thread does both": """
        class Client(threading.Thread):
            def run(self):
                self.sock.sendall(b"x")
                self.sock.recv(1)
            def finish(self):
                self.join()
        """,
    "plain TCP only, refused": """
        class Client:
            def __init__(self, sock):
                if isinstance(sock, ssl.SSLSocket):
                    raise TypeError("plain TCP only")
                self.sock = sock
                self.threads = [threading.Thread(target=f) for f in (self._read, self._write)]
            def _write(self):
                self.sock.sendall(b"1\\n")
            def _read(self):
                self.sock.recv(100)
        """,
    "a socket each": """
        def bulk(client, server):
            def receive():
                server.recv(100)
            reader = threading.Thread(target=receive)
            client.sendall(b"x")
        """,
    "ssl without threads": """
        tls = ctx.wrap_socket(raw, server_hostname="vip")
        tls.sendall(b"x")
        tls.recv(1)
        """,
}


@pytest.mark.parametrize("name", BAD)
def test_the_check_finds_shared_sockets(name: str) -> None:
    assert problems(textwrap.dedent(BAD[name])), name


@pytest.mark.parametrize("name", GOOD)
def test_the_check_lets_single_owners_be(name: str) -> None:
    assert problems(textwrap.dedent(GOOD[name])) == [], name
