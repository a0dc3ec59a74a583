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


def test_usage_errors_are_one_line_naming_the_help_to_read(capsys):
    # click's own form is four lines (usage, a hint, a blank line, the error).
    for argv, words in ((["no-such-command"], "No such command 'no-such-command'. (see toolchain --help)"),
                        (["run"], "Missing argument 'RECIPE'. (see toolchain run --help)"),
                        (["export", "x.pt", "--threshold", "nan"], "'nan' is not a finite number. "
                                                                  "(see toolchain export --help)")):
        assert main(argv) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "toolchain", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "toolchain" in proc.stdout


def test_an_out_folder_under_a_file_is_bad_input_not_an_internal_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc = main(["data", "synth", "--out", str(tmp_path / "afile" / "faces"), "--identities", "4", "--pairs", "20"])
    err = capsys.readouterr().err
    assert rc == 2 and "a file stands where a folder is needed" in err and "internal error" not in err


def test_nan_and_inf_options_are_refused(tmp_path, capsys):
    """nan compares false with every bound: `--max-accuracy-drop nan` made a check that never fails."""
    probe = tmp_path / "probe.npz"
    probe.write_bytes(b"")
    for value in ("nan", "inf", "-inf"):
        assert main(["parity", "x.pte", "--pairs", str(probe), "--max-accuracy-drop", value]) == 2
        assert "is not a finite number" in capsys.readouterr().err


def test_an_unwritable_json_path_fails_before_the_work(tmp_path, capsys):
    """`bench --json` under a file failed only after the whole benchmark had run."""
    (tmp_path / "afile").write_text("x")
    rc = main(["bench", "verifier", "--out", str(tmp_path / "b"), "--json", str(tmp_path / "afile" / "x.json")])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
