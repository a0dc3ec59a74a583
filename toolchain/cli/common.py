"""What every command shares: its third-party output goes to a log file (toolchain.console)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

DEFAULT_LOG_DIR = Path("artifacts") / "logs"


def logged(log_name: str, dir_param: str | None = "out_dir"):
    """Run the command with third-party output captured in a log beside its --out folder
    (`OUT.<log_name>`: the folder itself holds only what the command writes), or in
    artifacts/logs/<log_name> for commands without one; `toolchain --verbose` shows it live."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            from toolchain.console import third_party_log

            folder = kwargs.get(dir_param) if dir_param else None
            ctx = click.get_current_context(silent=True)
            verbose = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("verbose"))
            log = Path(folder).parent / f"{Path(folder).name}.{log_name}" if folder else DEFAULT_LOG_DIR / log_name
            with third_party_log(log, verbose=verbose):
                return fn(*args, **kwargs)
        return inner
    return wrap


def run_logged(ctx: click.Context, log: Path):
    """third_party_log for a command that picks its own log path."""
    from toolchain.console import third_party_log

    root = ctx.find_root().obj or {}
    return third_party_log(log, verbose=bool(root.get("verbose")))


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: nan compares false with every bound, so a
    plain range took `--max-accuracy-drop nan` and the check it set could never fail."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


FINITE_FLOAT = FiniteFloatRange()


def check_output_file(path: str | None) -> None:
    """Fail now, not after minutes of work, when the file `path` names cannot be written: the
    nearest folder that exists above it must be a folder we may write in."""
    import tempfile

    from toolchain.errors import ToolchainError

    if not path:
        return
    parent = Path(path).resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ToolchainError(f"{path}: {existing} is a file, not a folder")
    try:  # a real write: as root, os.access says yes to read-only mounts such as /sys
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ToolchainError(f"{path}: cannot write in {existing} ({exc.strerror})") from exc
