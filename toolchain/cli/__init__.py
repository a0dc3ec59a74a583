"""The `toolchain` console script.

Thin by design: each sub-module parses one command family and calls the library. Errors are
mapped to the exit-code contract here: 2 for bad input, 1 for a failed check, with a one-line
reason on stderr (the traceback only with --debug).
"""

from __future__ import annotations

import importlib
import sys

import click

from toolchain import __version__
from toolchain.errors import ToolchainError

# (module, attribute) of every command; each module owns one command family.
_COMMANDS = [
    ("toolchain.cli.profile", "profile"),
    ("toolchain.cli.profile", "check"),
    ("toolchain.cli.data", "data"),
    ("toolchain.cli.train", "train"),
    ("toolchain.cli.train", "enroll"),
    ("toolchain.cli.train", "evaluate"),
    ("toolchain.cli.export", "export"),
    ("toolchain.cli.export", "parity"),
    ("toolchain.cli.export", "bench"),
    ("toolchain.cli.run", "run"),
    ("toolchain.cli.doctor", "doctor"),
    ("toolchain.cli.fleet", "fleet"),
    ("toolchain.cli.serve", "serve"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="toolchain")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--verbose", is_flag=True, help="Show the third-party libraries' output live instead of "
              "sending it to the command's log (run.log, export.log, ...).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Train, enroll, quantize, export and check tiny face-verification models."""
    ctx.ensure_object(dict).update(debug=debug, verbose=verbose)


def _register() -> None:
    for module_name, attr in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command family not built yet
                continue
            raise
        command = getattr(module, attr, None)
        if command is not None:
            cli.add_command(command)


_register()


def _log_hint(message: str) -> str:
    """Where the third-party libraries' own output of a failed command went."""
    from toolchain.console import last_log

    log = last_log()
    return f" (library output: {log})" if log is not None and str(log) not in message else ""


def _os_error_line(exc: OSError) -> str:
    """One line naming the path an OSError is about, and what is wrong with it."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        why = "a file stands where a folder is needed"
    elif isinstance(exc, PermissionError):
        why = "permission denied"
    else:
        why = exc.strerror or type(exc).__name__
    return f"{exc.filename}: {why}"


def _internal_error(exc: Exception) -> int:
    click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug){_log_hint(str(exc))}", err=True)
    return 3


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        # Non-standalone click returns the exit code of ctx.exit() (e.g. after --help).
        result = cli.main(args=args, prog_name="toolchain", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:  # usage errors: one line, exit 2, as every bad input
        where = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx is not None else None
        click.echo(f"error: {exc.format_message()}" + (f" (see {where} --help)" if where else ""), err=True)
        return exc.exit_code
    except ToolchainError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}{_log_hint(str(exc))}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as exc:
        # A path the user gave (an --out under a file, a folder without write permission) is bad
        # input; an OSError without a path is not, and falls through to the internal error.
        if debug:
            raise
        if exc.filename is None:
            return _internal_error(exc)
        click.echo(f"error: {_os_error_line(exc)}{_log_hint(str(exc))}", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - the contract is one line, not a traceback
        if debug:
            raise
        return _internal_error(exc)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
