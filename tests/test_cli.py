"""The CLI's exit-code contract: 0 success, 2 usage/bad input, one line on stderr."""

import subprocess
import sys

from toolchain.cli import main


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_unknown_command_exits_two(capsys):
    assert main(["no-such-command"]) == 2
    assert "no-such-command" in capsys.readouterr().err


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "toolchain", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "toolchain" in proc.stdout
