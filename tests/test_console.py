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


def test_failed_command_names_its_log(tmp_path, capsys):
    from toolchain.cli import main

    # A missing checkpoint fails inside the command, after its log was opened.
    rc = main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert str(tmp_path / "out.export.log") in err


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
