"""Compile BPF C files with BCC, turning clang's stderr chatter into a clear exception."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class BpfBuildError(RuntimeError):
    """A BPF program did not compile or load; the message carries the first compiler lines."""


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture file descriptor 2 (where BCC's clang writes) into the yielded list."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def _errors(lines: list[str], limit: int = 3) -> str:
    interesting = [ln.strip() for ln in lines if "error" in ln.lower()] or lines
    return " | ".join(interesting[:limit])


def compile_file(path: Path, cflags: Sequence[str] = ()) -> Any:
    """Compile ``path`` with BCC and return the ``bcc.BPF`` object."""
    # Debian's python3-bpfcc, imported late so that the CLI works without it.
    from bcc import BPF  # noqa: PLC0415

    if not path.is_file():
        raise BpfBuildError(f"BPF source {path} does not exist")
    with captured_stderr() as lines:
        try:
            return BPF(src_file=str(path).encode(), cflags=list(cflags))
        except Exception as exc:
            failure = exc
    raise BpfBuildError(f"{path.name}: {failure}: {_errors(lines)}")


def load_func(bpf: Any, name: str, prog_type: int) -> Any:
    """Load one function of a compiled module into the kernel (needs CAP_BPF/SYS_ADMIN)."""
    with captured_stderr() as lines:
        try:
            return bpf.load_func(name.encode(), prog_type)
        except Exception as exc:
            failure = exc
    raise BpfBuildError(f"loading {name}: {failure}: {_errors(lines)}")
