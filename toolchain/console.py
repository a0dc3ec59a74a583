"""A clean console: the toolchain's own lines on the terminal, third-party output in a log.

TensorFlow, onnx2tf, ExecuTorch, LiteRT and torchao write notices from C++ straight to file
descriptors 1 and 2, and from Python to `sys.stderr`, logging and warnings. While
`third_party_log` is active:
- descriptors 1 and 2 point at the log file;
- `sys.stderr`, the root logger and warnings write to the log;
- `sys.stdout` writes to the original terminal, so click and rich output (tables, progress)
  reaches the user; the toolchain's own stderr lines (stage progress) use `own_stderr`, which
  writes to the original stderr.
A problem that matters still surfaces: conversion failures and refused delegation are raised as
the toolchain's own one-line errors, which name the log. The streams made for a capture stay
open afterwards: a library that kept a reference to one (torch's logging handlers do) keeps
writing where it wrote during the capture instead of failing on a closed file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path

_last_log: Path | None = None  # of the innermost active capture, or the last one (error messages name it)
_own_err = None  # the terminal's stderr while a capture is active


def last_log() -> Path | None:
    return _last_log


class _OwnStderr(io.TextIOBase):
    """The toolchain's stderr: the terminal's, even while a capture sends sys.stderr to a log."""

    def _target(self):
        return _own_err if _own_err is not None else sys.stderr

    def write(self, s: str) -> int:
        return self._target().write(s)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()

    def fileno(self) -> int:
        return self._target().fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._target(), "encoding", "utf-8")


own_stderr = _OwnStderr()


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _text_stream(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(os.fdopen(os.dup(fd), "wb"), encoding="utf-8", line_buffering=True, errors="replace")


def _terminal_stream(stream, saved: dict[int, int]):
    """A stream writing where `stream` wrote before fds 1 and 2 moved. A stream not backed by
    fd 1 or 2 (pytest's capture, a StringIO) is kept as it is."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    return _text_stream(saved[fd]) if fd in saved else stream


@contextlib.contextmanager
def third_party_log(log_path: str | Path | None, verbose: bool = False):
    """Send third-party output to `log_path` (appended) while active; `verbose` (or no path, or
    TOOLCHAIN_VERBOSE=1) leaves everything live. Yields the log path, or None.

    A log this capture created and nothing wrote to is removed afterwards, with the folders made
    for it, and is not named by errors: a command refused on bad input leaves nothing behind."""
    global _last_log, _own_err
    if verbose or log_path is None or os.environ.get("TOOLCHAIN_VERBOSE") == "1":
        yield None
        return
    path = Path(log_path)
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_stdio()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv[:3])}\n".encode()
    os.write(log_fd, header)
    old_last = _last_log
    old = sys.stdout, sys.stderr, _own_err
    term_out, term_err = _terminal_stream(sys.stdout, saved), _terminal_stream(sys.stderr, saved)
    log_stream = _text_stream(log_fd)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout, sys.stderr, _own_err = term_out, log_stream, term_err
    handler = logging.StreamHandler(log_stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _last_log = path
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        root.handlers, root.level = old_handlers, old_level
        for stream in (log_stream, term_out, term_err):
            with contextlib.suppress(Exception):
                stream.flush()
        _flush_c_stdio()  # C++ writes buffered in libc's stdout belong in the log, not after it
        sys.stdout, sys.stderr, _own_err = old
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        for fd in (*saved.values(), log_fd):
            os.close(fd)
        with contextlib.suppress(OSError):  # tidying must not hide the command's own error
            if not existed and path.stat().st_size == len(header):
                path.unlink()
                _last_log = old_last
                for folder in made:  # innermost first
                    folder.rmdir()


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0, enabled: bool = True):
    """A rich progress bar; yields `advance(n, **fields)` (a no-op when disabled)."""
    if not enabled:
        yield lambda n=1, **kw: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")

        def advance(n: int = 1, **fields) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, info=info)

        yield advance
