"""`toolchain export`, `toolchain parity` and `toolchain bench`.

Thin: parses, calls toolchain.export / toolchain.evaluate.parity, prints. Heavy imports (torch,
executorch, tensorflow) happen inside the commands so that `toolchain --help` stays fast.
"""

from __future__ import annotations

import json

import click

from toolchain.cli.common import FINITE_FLOAT, FiniteFloatRange, check_output_file, logged


def _console():
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


@click.command("export")
@click.argument("source", metavar="MODEL_OR_CHECKPOINT_OR_USER_DIR")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--formats", default="executorch,tflite", show_default=True, help="Comma list: executorch, tflite.")
@click.option("--precisions", default="int8,fp32", show_default=True, help="Comma list: int8, fp32.")
@click.option("--calibration", type=click.Path(), help="Calibration images: .npy/.npz (uint8 NHWC), an image "
              "folder or a pairs file. Required for int8.")
@click.option("--calibration-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="At most this many calibration images.")
@click.option("--tflite-backend", type=click.Choice(["onnx2tf", "litert-torch"]), default="onnx2tf",
              show_default=True, help="TFLite converter.")
@click.option("--calibration-method", type=click.Choice(["mse", "minmax", "percentile"]), default="mse",
              show_default=True, help="How int8 activation ranges are chosen (PT2E files: .pte, litert-torch .tflite).")
@click.option("--percentile", type=FiniteFloatRange(50, 100, min_open=True), default=99.99, show_default=True,
              help="--calibration-method percentile: the share of values kept in range.")
@click.option("--outlier-factor", type=FiniteFloatRange(min=1, min_open=True), default=None,
              help="Leave out calibration images whose activations exceed this many times the set's median at "
                   "some layer (default: keep all).")
@click.option("--bias-correction", is_flag=True, help="Biases absorb each int8 file's mean error against float (.pte and .tflite).")
@click.option("--equalize", is_flag=True, help="Cross-layer range equalization before int8 (exact in float).")
@click.option("--qat-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Embedding models: PT2E QAT steps towards the float embeddings, on the calibration images.")
@click.option("--qat-lr", type=FiniteFloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              help="QAT learning rate (Adam).")
@click.option("--fallback-cosine-mean", type=FiniteFloatRange(-1, 1), default=None,
              help="Embedding models: keep the most sensitive layers in float (.pte) until the mean embedding "
                   "cosine to float reaches this.")
@click.option("--fallback-cosine-min", type=FiniteFloatRange(-1, 1), default=None,
              help="... and the lowest one reaches this.")
@click.option("--max-float-layers", type=click.IntRange(min=1), default=8, show_default=True,
              help="The fallback keeps at most this many layers (or blocks) in float.")
@click.option("--fallback-unit", type=click.Choice(["layer", "block"]), default="layer", show_default=True,
              help="What the fallback keeps in float: one conv or linear layer, or one block of the model, at a time.")
@click.option("--threshold", type=FINITE_FLOAT, help="Decision threshold of a verifier (default: enrollment.json's).")
@click.option("--require-full-delegation/--allow-partial-delegation", default=None,
              help="Fail unless everything runs in XNNPACK (default: only for the verifier).")
@click.option("--json", "as_json", is_flag=True, help="Print the artifact records as JSON.")
@logged("export.log")
def export(source, out_dir, formats, precisions, calibration, calibration_size, tflite_backend, calibration_method,
           percentile, outlier_factor, bias_correction, equalize, qat_steps, qat_lr, fallback_cosine_mean, fallback_cosine_min,
           max_float_layers, fallback_unit, threshold, require_full_delegation, as_json) -> None:
    """Export a float model to ExecuTorch (.pte) and TFLite, int8 and fp32, with checks.

    Writes DIR/<model>_<precision>.pte|.tflite and DIR/export_manifest.json (sha256, bytes,
    format, precision, backend, source). int8 files are checked: the .pte for XNNPACK
    delegation, the .tflite flatbuffer for int8 tensors end to end.
    """
    from toolchain.export import export_model

    records = export_model(source, out_dir, formats, precisions, calibration, calibration_size=calibration_size,
                           tflite_backend=tflite_backend, threshold=threshold,
                           require_full_delegation=require_full_delegation, progress=not as_json,
                           int8={"calibration": calibration_method, "percentile": percentile,
                                 "outlier_factor": outlier_factor,
                                 "bias_correction": bias_correction, "equalize": equalize,
                                 "qat_steps": qat_steps, "qat_lr": qat_lr,
                                 "fallback": fallback_cosine_mean is not None or fallback_cosine_min is not None,
                                 "max_float_layers": max_float_layers, "fallback_unit": fallback_unit},
                           fallback_targets={"min_cosine_mean": fallback_cosine_mean,
                                             "min_cosine_min": fallback_cosine_min})
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    from rich.table import Table

    t = Table(title=f"exported to {out_dir}")
    for col in ("file", "format", "precision", "backend", "bytes", "checks"):
        t.add_column(col)
    for r in records:
        d = r.checks.get("delegation")
        if d:
            note = f"{d['partitions']} XNNPACK partition(s); outside: " + (
                ", ".join(f"{k} x{v}" for k, v in d["ops_outside"].items()) or "nothing")
            if d.get("float_ops"):
                note += "; left in float: " + ", ".join(f"{k} x{v}" for k, v in d["float_ops"].items())
            if d.get("xnnpack_float_nodes"):  # what the file's XNNPACK graph runs in float
                note += "; float in XNNPACK: " + ", ".join(f"{k} x{v}" for k, v in d["xnnpack_float_nodes"].items())
        else:
            c = r.checks.get("tflite", {})
            note = ("int8 end to end" if c.get("is_int8") else "float") + (
                "; XNNPACK int8 refuses " + ", ".join(c["xnnpack_unsupported"]) if c.get("xnnpack_unsupported") else "")
        t.add_row(r.file, r.format, r.precision, r.backend, str(r.bytes), note)
    _console().print(t)


@click.command("parity")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--pairs", "eval_set", required=True, type=click.Path(exists=True),
              help="Verification pairs (backbones) or a probe set .npz (verifiers).")
@click.option("--reference", type=click.Path(exists=True), help="Float model (checkpoint or user folder); "
              "default: the source recorded in export_manifest.json.")
@click.option("--max-accuracy-drop", type=FINITE_FLOAT, default=0.3, show_default=True, help="Points.")
@click.option("--min-agreement", type=FINITE_FLOAT, default=99.5, show_default=True,
              help="Percent of decisions equal to the float model's.")
@click.option("--max-tar-drop", type=FiniteFloatRange(min=0), default=None,
              help="Points of TAR at FAR=1e-3 (default: not checked).")
@click.option("--min-cosine-mean", type=FiniteFloatRange(-1, 1), default=None,
              help="Embedding models: mean embedding cosine to float (default: not checked).")
@click.option("--min-cosine-min", type=FiniteFloatRange(-1, 1), default=None,
              help="Embedding models: lowest embedding cosine to float (default: not checked).")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True, help="Latency repeats.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (scores included).")
@click.option("--arch", type=click.Choice(["x86_64", "arm64"]), default="x86_64", show_default=True,
              help="arm64: run each .tflite on XNNPACK's ARM kernels under emulation (`make arm-env`) "
                   "and compare with x86 and the float model.")
@click.option("--sample", type=click.IntRange(min=10), default=200, show_default=True,
              help="With --arch arm64: probes or pairs sampled (seeded) from the set; emulation is slow.")
@click.option("--arm-cpu", default=None, help="With --arch arm64: qemu's CPU model (default max: sdot and "
              "i8mm; cortex-a53: neither).")
@logged("parity.log", None)
def parity(artifacts, eval_set, reference, max_accuracy_drop, min_agreement, max_tar_drop, min_cosine_mean,
           min_cosine_min, repeats, as_json, arch, sample, arm_cpu) -> None:
    """Run each artifact in its own runtime against the float model; exit 1 if a bound fails."""
    from toolchain.evaluate.parity import ParityBounds, check_parity, run_parity

    bounds = ParityBounds(max_accuracy_drop, min_agreement, max_tar_drop, min_cosine_mean, min_cosine_min)
    if arch == "arm64":
        return _parity_arm64(artifacts, eval_set, reference, bounds, sample, arm_cpu, as_json)

    rows = run_parity(artifacts, eval_set, reference, bounds, repeats=repeats)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        from rich.table import Table

        t = Table(title="parity against the float model (torch eager)")
        for col in ("artifact", "runtime", "accuracy", "float", "drop", "agree %", "flips / expected / allowed",
                    "noise / budget", "max gap", "mean gap", "cos mean/min", "ms", "passed"):
            t.add_column(col)
        for r in rows:
            cos = (f"{r['embedding_cosine_mean']:.4f}/{r['embedding_cosine_min']:.4f}"
                   if "embedding_cosine_mean" in r else "-")
            t.add_row(r["file"], r["runtime"], f"{r['accuracy']:.2f}", f"{r['float_accuracy']:.2f}",
                      f"{r['accuracy_drop']:+.2f}", f"{r['decision_agreement']:.2f}",
                      f"{r['flips']} / {r['expected_flips']:.1f} / {r['allowed_flips']}",
                      f"{r['score_noise']:.4f} / {r['noise_budget']:.4f}", f"{r['max_abs_gap']:.4g}",
                      f"{r['mean_abs_gap']:.4g}", cos, f"{r['latency_ms']:.3f}",
                      "yes" if r["passed"] else f"NO: {r['reason']}")
        _console().print(t)
    check_parity(rows)


def _parity_arm64(artifacts, eval_set, reference, bounds, sample, cpu, as_json) -> None:
    from toolchain.evaluate.arm64 import arm_parity, check_arm

    rows = arm_parity(artifacts, eval_set, reference, bounds, sample=sample, cpu=cpu)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        from rich.table import Table

        t = Table(title=f"x86 against ARM (aarch64 under qemu, CPU model {cpu or 'max'}), {rows[0]['num']} "
                        "probes or pairs sampled")
        for col in ("artifact", "identical outputs", "max int8 step diff", "agree ARM/x86 %", "agree ARM/float %",
                    "agree x86/float %", "acc ARM / x86 / float", "passed"):
            t.add_column(col)
        for r in rows:
            if "skipped" in r:
                t.add_row(r["file"], *["-"] * 6, r["skipped"])
                continue
            t.add_row(r["file"], f"{r['identical_outputs']}/{r['outputs']}",
                      "-" if r["max_step_diff"] is None else str(r["max_step_diff"]),
                      f"{r['agreement_arm_x86']:.2f}", f"{r['agreement_arm_float']:.2f}",
                      f"{r['agreement_x86_float']:.2f}",
                      f"{r['accuracy_arm']:.2f} / {r['accuracy_x86']:.2f} / {r['accuracy_float']:.2f}",
                      "yes" if r["passed"] else f"NO: {r['reason']}")
        _console().print(t)
    check_arm(rows)


@click.command("bench")
@click.argument("models", nargs=-1)
@click.option("--out", "out_dir", default="artifacts/bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--formats", default="executorch,tflite", show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=100, show_default=True,
              help="Calls per file and round (more for a file faster than 1 ms: each round runs it >= 0.1 s).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Rounds of latency measurement; each takes every file in turn, int8 then fp32.")
@click.option("--pairs", type=click.IntRange(min=20), default=100, show_default=True,
              help="Synthetic verification pairs for the parity columns.")
@click.option("--calibration-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--tflite-backend", type=click.Choice(["onnx2tf", "litert-torch"]), default="onnx2tf",
              show_default=True, help="TFLite converter.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows (with the CPU facts) to this JSON file.")
@click.option("--users", "fleet_users", type=click.IntRange(min=1), default=1000, show_default=True,
              help="`bench fleet`: synthetic users to write.")
@click.option("--hypernet", type=click.Path(dir_okay=False), default="artifacts/demo/train/hypernet/hypernet.pt",
              show_default=True, help="`bench fleet`: the hypernet checkpoint (`make demo` writes this one).")
@click.option("--check-users", type=click.IntRange(min=0), default=20, show_default=True,
              help="`bench fleet`: users whose files are compared with their full exports.")
@click.option("--no-amx", "no_amx", is_flag=True,
              help="Deny this process Intel AMX (Linux x86-64), so that XNNPACK runs the int8 kernels of a "
                   "VNNI CPU without AMX; the table says so.")
@logged("bench.log")
def bench(models, out_dir, formats, repeats, rounds, pairs, calibration_size, tflite_backend, json_path, fleet_users,
          hypernet, check_users, no_amx) -> None:
    """Export MODELS (default: verifier and the zoo backbones) int8+fp32 to both runtimes and
    measure sizes, single-thread latency ratios and int8 parity in one run.

    `toolchain bench fleet --users N`: N synthetic users' int8 files through `toolchain fleet`,
    against full exports (template build, write time per file, time per user with the embedding
    apart, their ratio; a sample checked byte for byte)."""
    from toolchain.atomic import write_json_atomic
    from toolchain.environment import cpu_facts, describe_cpu
    from toolchain.errors import CheckFailed, ToolchainError
    from toolchain.export.api import FORMATS, _parse_list, check_source
    from toolchain.export.bench import DEFAULT_MODELS, render_table, run_bench

    check_output_file(json_path)
    if no_amx:  # before any library starts and asks for AMX (toolchain.runtime.amx)
        from toolchain.runtime.amx import deny_amx

        deny_amx()

    def machine() -> dict:
        return cpu_facts() | ({"amx": "denied"} if no_amx else {})

    if tuple(models) == ("fleet",):
        from pathlib import Path

        from toolchain.fleet.bench import bench_fleet, render_fleet_table
        from toolchain.console import progress_bar

        if not Path(hypernet).is_file():
            raise ToolchainError(f"{hypernet}: no hypernet checkpoint (run `make demo` first, or pass --hypernet)")
        cpu = machine()
        rows = bench_fleet(hypernet, fleet_users, out_dir, formats=_parse_list(formats, FORMATS, "format"),
                           check_users=check_users, progress_bar=lambda what, n: progress_bar(what, n), say=click.echo)
        _console().print(render_fleet_table(rows, describe_cpu(cpu)))
        if json_path:
            write_json_atomic(json_path, {"cpu": cpu, "fleet": rows})
        return

    for name in models:  # a typo fails now, not after the other models' minutes of export
        check_source(name)

    def partial(row):  # long runs: say which model is done as soon as it is measured
        click.echo(f"measured {row['model']}" + (f": FAILED ({row['error']})" if row.get("error") else ""))

    rows = run_bench(models or DEFAULT_MODELS, out_dir, _parse_list(formats, FORMATS, "format"), repeats=repeats,
                     pairs=pairs, calibration_size=calibration_size, tflite_backend=tflite_backend,
                     progress=True, on_row=partial, rounds=rounds)
    cpu = machine()
    table = render_table(rows, cpu)
    table.caption = f"{table.caption}\nCPU: {describe_cpu(cpu)}"
    _console().print(table)
    if json_path:
        write_json_atomic(json_path, {"cpu": cpu, "rows": rows})
        click.echo(f"rows: {json_path}")
    failed = [row["model"] for row in rows if row.get("error")]
    if failed:  # the table shows why; a CI step must not read a failed export as measured
        raise CheckFailed(f"bench: {len(failed)} of {len(rows)} models failed: {', '.join(failed)}")
