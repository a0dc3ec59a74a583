"""toolchain.console: third-party output (fd-level C++ writes, logging, warnings) in the log,
the toolchain's own lines on the console."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import logging, os, sys, warnings
    from toolchain.console import third_party_log
    with third_party_log(sys.argv[1]):
        print("own stdout line")
        from toolchain.console import own_stderr; print("own stderr line", file=own_stderr)
        os.write(1, b"[cpuinfo_utils.cpp:71] c++ noise on fd 1\\n")
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
        logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
        warnings.warn("a library warning")
        print("a library's python stderr", file=sys.stderr)
    print("after the capture")
    os.write(2, b"fd 2 restored\\n")
""")


def test_third_party_output_goes_to_the_log(tmp_path):
    log = tmp_path / "run.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    console = res.stdout + res.stderr
    assert "own stdout line" in res.stdout and "own stderr line" in res.stderr
    assert "after the capture" in res.stdout and "fd 2 restored" in res.stderr
    for noise in ("cpuinfo_utils", "XNNPACK delegate", "_C_mxfp8", "a library warning", "python stderr"):
        assert noise not in console, noise
        assert noise in log.read_text(), noise


def test_verbose_leaves_everything_live(tmp_path):
    log = tmp_path / "run.log"
    script = SCRIPT.replace("third_party_log(sys.argv[1])", "third_party_log(sys.argv[1], verbose=True)")
    res = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60)
    assert "cpuinfo_utils" in res.stdout and "XNNPACK delegate" in res.stderr and "python stderr" in res.stderr
    assert not log.exists()


def test_a_command_refused_on_bad_input_leaves_no_log_behind(tmp_path, capsys, monkeypatch):
    import toolchain.console
    from toolchain.cli import main

    monkeypatch.setattr(toolchain.console, "_last_log", None)  # as in a fresh process

    # A missing checkpoint fails inside the command, after its log was opened; nothing wrote to it.
    rc = main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "sub" / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert ".log" not in err and not (tmp_path / "sub").exists()


def test_a_log_a_library_wrote_to_is_kept_and_named(tmp_path):
    import os

    from toolchain.cli import _log_hint
    from toolchain.console import last_log, third_party_log

    before = last_log()
    with third_party_log(tmp_path / "logs" / "quiet.log"):
        pass
    assert not (tmp_path / "logs").exists() and last_log() == before
    with third_party_log(tmp_path / "logs" / "noisy.log") as log:
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    assert "XNNPACK delegate" in log.read_text() and last_log() == log
    assert _log_hint("failed") == f" (library output: {log})"
    # An existing log is appended to and kept, written to or not.
    with third_party_log(log):
        pass
    assert log.read_text().count("===") == 2


@pytest.mark.slow
def test_a_real_command_keeps_the_console_clean(tmp_path):
    """`toolchain doctor` runs ExecuTorch, onnx2tf and LiteRT: their notices land in its log."""
    res = subprocess.run([sys.executable, "-m", "toolchain", "doctor", "--artifacts", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    console = res.stdout + res.stderr
    # A nearly full disk is the machine's state, not the console's: it may be the one failed check.
    disk_only = "doctor: 1 check(s) failed: free disk at" in console
    assert res.returncode == 0 or (res.returncode == 1 and disk_only), console
    assert "toolchain doctor" in console
    assert "doctor: this environment runs the recipes" in console or disk_only
    for noise in ("cpuinfo_utils", "Created TensorFlow Lite XNNPACK delegate", "oneDNN", "absl::InitializeLog",
                  "_pytree.py"):
        assert noise not in console, noise
    assert "Created TensorFlow Lite XNNPACK delegate" in (tmp_path / "doctor.log").read_text()
