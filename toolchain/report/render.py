"""report.md and report.html of a run, from the manifest's content and the saved parity scores.

Markdown is the source; the HTML is the same text through the Markdown package. Plots are PNG
files in `report_files/` next to the report, linked by relative path, so the folder can be moved
or served as it is.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import markdown as md_lib
import numpy as np

from toolchain.environment import describe_cpu
from toolchain.evaluate.parity import image_place
import toolchain.report.plots as plots

PLOTS_DIR = "report_files"
NOT_EXPORTED = "not exported"


# ----------------------------------------------------------------------------------- formatting


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _count(v: Any) -> str:
    """Large counts as M/k, so MACs and params read at a glance."""
    if v is None:
        return "n/a"
    v = float(v)
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.1f}k"
    return f"{v:,.0f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.2f}%"


def _signed(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None else f"{float(v):+.{digits}f}"


def _verdict(passed: Any) -> str:
    return "PASS" if passed else "FAIL"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _accuracy_percent(v: Any) -> Optional[float]:
    """Accuracies are fractions in the manifest; shown as percent."""
    return None if v is None else 100.0 * float(v)


# ------------------------------------------------------------------------------------- sections


def _budget_section(core: Mapping, plot: Optional[str]) -> list[str]:
    budgets = core.get("budgets", [])
    out = ["## Budgets", ""]
    if not budgets:
        return out + ["No budgets in this recipe.", ""]
    rows = [[b["name"], _num(b["value"]), _num(b["limit"]), _verdict(b["passed"])] for b in budgets]
    out += [_table(["budget", "value", "limit", "verdict"], rows), ""]
    if plot:
        out += [f"![budget bars: value / limit]({plot})", ""]
    return out


def _evaluation_section(core: Mapping) -> list[str]:
    ev = core.get("evaluation") or {}
    if not ev:
        return []
    out = ["## Evaluation on the verification pairs", ""]
    rows = []
    routes = ev.get("routes") or {}
    diagnosis = ev.get("diagnosis") or {}
    route = ev.get("per_user_route")
    for e, label in ((ev.get("per_user"), f"per-user route (hypernetwork + f{', ' + route if route else ''})"),
                     (routes.get("per_user") if ev.get("per_user_route") == "symmetric" else None,
                      "per-user route, one side (f(b; theta_a))"),
                     (ev.get("backbone"), "backbone baseline (cosine of embeddings)"),
                     (diagnosis.get("trunk_cosine"), "diagnosis: cosine of f's trunk features"),
                     (diagnosis.get("head_upper_bound"), "diagnosis: upper bound, head fitted on many images")):
        if isinstance(e, Mapping):
            tar = (e.get("tar_at_far") or {}).get("1e-3")
            rows.append([label, _pct(_accuracy_percent(e.get("accuracy"))),
                         _num(_accuracy_percent(e.get("accuracy_std")), 2), _pct(_accuracy_percent(tar)),
                         _num(e.get("auc"), 4), _num(e.get("pairs"))])
    if rows:
        folds = (ev.get("per_user") or {}).get("folds", "contiguous")
        out += [_table(["scorer", "accuracy", "std (10 folds, points)", "TAR@FAR=1e-3", "AUC", "pairs"], rows), "",
                f"Accuracy: 10-fold protocol (threshold chosen on the other nine folds; {folds} folds).", ""]
        if diagnosis.get("trunk_cosine"):
            out += ["Reading the diagnosis: trunk cosine far below backbone cosine points at the trunk's "
                    "capacity; the per-user route below the fitted-head upper bound points at generating "
                    "the head from one photo; a per-user AUC near the bound's with lower accuracy points at "
                    "scores not calibrated across users.", ""]
    if ev.get("pairs_file"):
        out += [f"Pairs: `{ev['pairs_file']}`.", ""]
    return out


def _parity_section(core: Mapping, scatter: Optional[str], roc: Optional[str]) -> list[str]:
    parity = core.get("parity", [])
    out = ["## Parity (each artifact in its runtime)", ""]
    if not parity:
        return out + ["No parity rows (nothing exported).", ""]
    # Parity rows are in percent already (toolchain.evaluate.parity's convention).
    rows = [[p["artifact"], _pct(p.get("float_accuracy")), _pct(p.get("accuracy")), _num(p.get("accuracy_drop")),
             _pct(p.get("decision_agreement")), _num(p.get("latency_ms")), _num(p.get("float_latency_ms")),
             _verdict(p.get("passed", True))]
            for p in parity]
    headers = ["artifact", "float accuracy", "artifact accuracy", "drop (points)",
               "decision agreement", "latency (ms)", "float torch latency (ms)", "verdict"]
    if any(p.get("tar_drop") is not None for p in parity):
        headers.insert(4, "TAR@FAR=1e-3 drop (points)")
        for row, p in zip(rows, parity):
            row.insert(4, _num(p.get("tar_drop")))
    if any(p.get("score_noise") is not None for p in parity):
        # Flips come from the artifact's scores moving against the threshold: all of them at once
        # (shift) or each pair its own way (noise).
        headers.insert(4, f"{parity[0].get('gap_of', 'score')} shift / noise")
        for row, p in zip(rows, parity):
            row.insert(4, f"{_signed(p.get('score_shift'))} / {_num(p.get('score_noise'), 4)}")
    if any(p.get("noise_budget") is not None for p in parity):
        # Flips expected at the file's noise (toolchain.evaluate.flips), and the noise the bound allows.
        headers.insert(-3, "flips: measured / expected / allowed")
        headers.insert(-3, "noise budget")
        for row, p in zip(rows, parity):
            row.insert(-3, f"{p.get('flips', '-')} / {_num(p.get('expected_flips'), 1)} / {p.get('allowed_flips', '-')}")
            row.insert(-3, _num(p.get("noise_budget"), 4))
    if any(p.get("embedding_cosine_mean") is not None for p in parity):
        # Embedding models: how close each artifact's embeddings are to the float model's.
        headers.insert(4, "embedding cosine to float (mean / min)")
        for row, p in zip(rows, parity):
            row.insert(4, f"{_num(p.get('embedding_cosine_mean'), 4)} / {_num(p.get('embedding_cosine_min'), 4)}")
    if any(p.get("refit_accuracy") is not None for p in parity):
        # Embedding models: the artifact's accuracy is at the float model's fold thresholds; its
        # own protocol (thresholds fitted again on its scores) is shown beside it.
        headers[2] = "artifact accuracy (float's thresholds)"
        headers.insert(3, "artifact accuracy (own thresholds)")
        for row, p in zip(rows, parity):
            row.insert(3, _pct(p.get("refit_accuracy")))
    out += [_table(headers, rows), ""]
    bounds = core.get("recipe", {}).get("parity", {})
    if bounds:
        extra = "".join(text for key, text in (
            ("max_tar_drop", f", TAR@FAR=1e-3 drop <= {bounds.get('max_tar_drop')} points"),
            ("min_embedding_cosine_mean", f", embedding cosine mean >= {bounds.get('min_embedding_cosine_mean')}"),
            ("min_embedding_cosine_min", f", embedding cosine min >= {bounds.get('min_embedding_cosine_min')}"))
            if bounds.get(key) is not None)
        out += [f"Bounds: accuracy drop <= {bounds.get('max_accuracy_drop')} points, decision agreement >= "
                f"{bounds.get('min_decision_agreement')}%{extra}. Latency: median of one single-image inference, "
                f"one thread, on {_latency_cpu(core)}.", ""]
        if any(p.get("noise_budget") is not None for p in parity):
            out += ["Flips expected: the sum over the pairs of Phi(-|float score - threshold| / score noise); "
                    "noise budget: the score noise at which that sum equals the flips the agreement bound "
                    "allows. A file far over its budget needs quieter int8 scores, not luck.", ""]
        probes = {p.get("num") for p in parity if p.get("num")}
        if probes:
            out += [f"Evaluated on {', '.join(str(n) for n in sorted(probes))} inputs per artifact.", ""]
    lowest = [p for p in parity if p.get("embedding_cosine_lowest") and p.get("precision") != "fp32"]
    if lowest:
        # The minimum bound hinges on one image: which ones, and whether they share a person.
        out += ["Lowest embedding cosines to float (the first listed pair each image is in, and its person):", ""]
        out += [f"- `{p.get('file') or p.get('artifact')}`: "
                + ", ".join(f"{x['cosine']:.4f} ({image_place(x)})" for x in p["embedding_cosine_lowest"])
                for p in lowest] + [""]
    out += _arm64_lines(core.get("parity_arm64", []))
    if scatter:
        out += [f"![parity scatter: float score vs artifact score]({scatter})", ""]
    if roc:
        out += [f"![ROC curves: float and each artifact]({roc})", ""]
    return out


def _cosine_targets(fallback: Mapping) -> str:
    """A fallback's targets in words ("cosine mean >= 0.999, ..., score noise at 0.786 <= 0.0059"):
    the cosine bounds and the agreement target (toolchain.evaluate.flips.agreement_target)."""
    targets = fallback.get("targets") or {}
    words = [f"{k.replace('min_cosine_', 'cosine ')} >= {v}" for k, v in targets.items()
             if v is not None and k.startswith("min_cosine_")]
    if targets.get("max_score_noise") is not None:
        words.append(f"score noise at {targets['score_threshold']:.3f} <= {targets['max_score_noise']:.5f}")
    return ", ".join(words)


def _fallback_trail(unit: str, fb: Mapping) -> list[str]:
    """A fallback's trail: what each step's choice measured on all the measuring images."""
    trail = fb.get("trail") or []
    if len(trail) < 2:
        return []
    sized = "bytes" in trail[0]
    aside = trail[0].get("set_aside")
    note = []
    if aside is not None:  # manifests from before the stopping rule have no set-aside
        ranked = f". The candidates are ranked on {fb['ranking_images']} of them" if fb.get("ranking_images") else ""
        note = [f"Each step's choice is judged on the {fb.get('images', '?')} measuring images with their mirrors, "
                f"after setting aside the lowest {len(aside)} cosines (rare images int8 gets badly wrong; parity "
                "still judges every pair); the mean target holds on the mean's one-sided 95% lower bound, since "
                f"parity judges the file on other images{ranked} (toolchain.quantize.selection).", ""]
    def step(t: Mapping) -> str:
        if t.get("units"):  # a whole set judged at once (the .pte's choice, tflite_fallback)
            return f"{t.get('source', 'given')}: " + ", ".join(f"`{u}`" for u in t["units"])
        tag = " (per byte)" if t.get("pass") == "per byte" else ""
        if t.get("removed"):  # the backward pass (toolchain.quantize.selection.drop_unneeded)
            return f"without `{t['removed']}`{tag}: " + ("back in int8" if t.get("met") else "still needed")
        return f"`{t['added']}`{tag}" if t.get("added") else ""

    noisy = "score_noise" in trail[0]
    rows = [[t["layers"], step(t), _num(t["cosine_mean"], 5),
             _num(t.get("cosine_mean_low"), 5), _num(t["cosine_min"], 5),
             ", ".join(_num(x, 4) for x in t.get("set_aside") or []) or "-"]
            + ([_num(t.get("score_noise"), 5)] if noisy else []) + ([f"{t['bytes']:,}"] if sized else []) for t in trail]
    head = [f"{unit}s in float", "step", "cosine mean", "mean, 95% lower bound", "cosine min", "set aside"]
    head += (["score noise at the threshold"] if noisy else []) + (["file bytes"] if sized else [])
    second = fb.get("per_byte")
    if second:  # toolchain.quantize.selection.forward_selection, `sized`
        note += [f"The largest-gain steps ({', '.join(f'`{u}`' for u in fb.get('tried') or [])}) missed the target "
                 f"within the size budget, so a second pass started again from all int8, each step taking the {unit} "
                 "with the largest gain per byte of the file (the rows marked per byte): it "
                 + ("met the target, and its choice is kept." if second.get("met") else "missed it too."), ""]
    return note + [_table(head, rows), ""]


def _int8_recovery_section(core: Mapping, plot: Optional[str], top: int = 15) -> list[str]:
    """What `export.int8` did before the runtimes quantised: QAT, the per-layer sensitivity, the fallback."""
    rec = core.get("int8_recovery") or {}
    if not rec:
        return []
    out = ["## int8 accuracy recovery", ""]
    outl = rec.get("calibration_outliers")
    if outl is not None:
        dropped = outl.get("left_out") or []
        detail = "; ".join(f"image {d['image']}: {_num(d['ratio'], 3)} x at `{d['layer']}`" for d in dropped)
        out += [f"Calibration outliers (activation peak above {_num(outl['factor'], 3)} x the images' median at some "
                f"layer; the typical image's worst ratio is {_num(outl['median_worst_ratio'], 3)}): "
                + (f"{len(dropped)} of {outl['images']} left out ({detail})." if dropped else
                   f"none of {outl['images']}."), ""]
    eq = rec.get("equalize")
    if eq is not None:
        found = eq["pairs"] or eq.get("streams")
        out += [f"Cross-layer range equalization: {eq['pairs']} conv pairs and {eq.get('streams', 0)} residual "
                "streams, " + (f"{eq['channels']} channels rescaled (median scale {_num(eq['scale_median'], 3)}, "
                               f"largest {_num(eq['scale_max'], 3)}); exact in float." if found else
                               "none found (no conv + BatchNorm into a conv through ReLU, PReLU or nothing, "
                               "and no residual stream read only by convs)."), ""]
    qat = rec.get("qat")
    if qat:
        out += [f"QAT (PT2E fake quantisation, loss 1 - cosine to the float embedding): {qat['steps']} steps, "
                f"batch {qat['batch']}, lr {qat['lr']:g}; loss {_num(qat['loss_first'], 5)} -> "
                f"{_num(qat['loss_last'], 5)}; fake-quantised cosine to float on a fixed batch "
                f"{_num(qat['fake_quant_cosine_before'], 5)} -> {_num(qat['fake_quant_cosine_after'], 5)}.", ""]
    sens = rec.get("sensitivity")
    if sens:
        base = sens["all_int8"]
        unit = sens.get("unit", "layer")
        aside = base.get("set_aside")
        noise = base.get("score_noise") is not None
        out += [f"Per-{unit} sensitivity on {sens['images']} identity images, each with its mirror (torch's "
                "reference int8 graph" + (f"; the fallback's ranking images, their lowest {len(aside)} cosines set "
                                          "aside" if aside is not None else "")
                + f"): all int8, mean / min embedding cosine to float {_num(base['cosine_mean'], 5)} / "
                f"{_num(base['cosine_min'], 5)}. Each row keeps one {unit} in float; "
                f"{sens.get('measured', len(sens['layers']))} of {len(sens['layers'])} {unit}s were measured"
                + ("" if unit == "block" else " (those where int8 adds the most noise locally: weights and output)")
                + (f". The score noise at the agreement target's threshold, over the pairs among these images, "
                   f"is {_num(base['score_noise'], 5)} all int8 (while that target is the only one missed, the "
                   "fallback ranks by the noise on all its measuring images)" if noise else "")
                + ". The most sensitive first:",
                "", _table([unit, "op", "local int8 noise", "cosine mean", "cosine min", "mean gained"]
                           + (["score noise", "noise removed"] if noise else []),
                           [[f"`{r['layer']}`", r["op"], f"{r['local_error']:.2e}" if r.get("local_error") is not None
                             else "n/a", _num(r["cosine_mean"], 5), _num(r["cosine_min"], 5),
                             "n/a" if r["gain_mean"] is None else f"{r['gain_mean']:+.5f}"]
                            + ([_num(r.get("score_noise"), 5),
                                "n/a" if r.get("gain_noise") is None else f"{r['gain_noise']:+.5f}"] if noise else [])
                            for r in sens["layers"][:top]]), ""]
        if plot:
            out += [f"![int8 sensitivity per layer]({plot})", ""]
    aim = rec.get("agreement_target")
    if aim:
        out += [f"Agreement target (toolchain.evaluate.flips.agreement_target): the float model's scores of the "
                f"{aim['pairs']:,} pairs set the threshold {aim['score_threshold']:.3f}. Parity allows "
                f"{aim['allowed_flips']} flips; {aim['expected_flips']:.1f} expected exceed that {aim['risk'] * 100:g}% of "
                f"the time, so the fallbacks aim at int8 score noise at most {aim['max_score_noise']:.5f} at the "
                "threshold, measured on their identity images.", ""]
    fb = rec.get("fallback")
    if fb:
        kept = fb.get("float_layers") or []
        targets = _cosine_targets(fb)
        unit = sens.get("unit", "layer") if sens else "layer"
        if kept:
            what = f"{len(kept)} {unit}(s) kept in float: " + ", ".join(f"`{k}`" for k in kept)
        elif fb.get("met"):
            what = f"every {unit} int8 already meets it"
        else:  # keeping units in float did not reach the target, so none is kept
            what = f"no {unit} kept in float ({len(fb.get('tried') or []) or 'no'} tried did not reach it)"
        out += [f"Fallback (target {targets}): {what}"
                + ("." if fb.get("met") else f"; the target was NOT met within the allowed {unit}s{_closest(fb)}."), ""]
        out += _fallback_trail(unit, fb)
        lat = fb.get("latency")
        if lat:
            out += [f"Latency cost ({lat.get('source') or 'wall'}): {_num(lat['with_float_layers'], 4)} ms with "
                    f"those layers in float against {_num(lat['all_int8'], 4)} ms all int8 "
                    f"({lat['ratio']:.2f} x), the .pte in ExecuTorch on {_latency_cpu(core)}.", ""]
    out += _tflite_fallback_lines(rec.get("tflite_fallback"))
    own = rec.get("tflite")
    if own:  # export.int8.tflite: the .tflite came from its own int8 graph
        opts = ", ".join(f"{k} {v}" for k, v in own["int8"].items())
        qat = own.get("qat")
        out += [f"The `.tflite` has its own int8 options ({opts})"
                + (f"; its QAT: {qat['steps']} steps, fake-quantised cosine {_num(qat['fake_quant_cosine_before'], 5)}"
                   f" -> {_num(qat['fake_quant_cosine_after'], 5)}." if qat else "; no QAT."), ""]
    return out


def _closest(fb: Mapping) -> str:
    """Why a fallback that missed its target still keeps units (toolchain.quantize.selection.quietest_short)."""
    return ("; they are the quietest choice it judged, the cosine targets met and the score noise above "
            "the agreement target" if fb.get("closest") else "")


def _tflite_fallback_lines(fb: Optional[Mapping]) -> list[str]:
    """The .tflite's fallback (toolchain.export.tflite_fallback): what LiteRT measured, what it kept."""
    if not fb:
        return []
    unit = fb.get("unit", "layer")
    kept = fb.get("float_units") or []
    names = ", ".join(f"`{k}`" for k in kept)
    if fb.get("given"):
        return [f"The `.tflite` keeps the {unit}s named by `export.int8.float_layers` in float: {names}.", ""]
    if fb.get("error"):
        return [f"The `.tflite`'s fallback did not run: {fb['error']}. The file is all int8.", ""]
    targets = _cosine_targets(fb)
    budget = f", within {fb['max_bytes']:,} bytes" if fb.get("max_bytes") else ""
    if kept:
        why = ("it keeps fewer than its own steps' choice, which also met it" if fb.get("why") == "fewer units"
               else "judged after its own steps missed the target")
        what = f"{len(kept)} {unit}(s) kept in float: {names}" + (
            f" (the `{fb['from']}`'s choice: {why})" if fb.get("from") else "")
    elif fb.get("met"):
        what = f"every {unit} int8 already meets it"
    else:
        what = f"no {unit} kept in float ({len(fb.get('tried') or []) or 'no'} tried did not reach it)"
    out = [f"`.tflite` fallback, measured in LiteRT (XNNPACK, one thread) on {fb.get('images', '?')} identity images "
           f"with their mirrors (target {targets}{budget}): {what}"
           + ("." if fb.get("met") else f"; the target was NOT met{_closest(fb)}."), ""]
    out += _fallback_trail(unit, fb)
    lat = fb.get("latency")
    if lat:
        out += [f"Latency cost ({lat['source']}): {_num(lat['with_float_layers'], 4)} ms with those {unit}s in float "
                f"against {_num(lat['all_int8'], 4)} ms all int8 ({lat['ratio']:.2f} x), one thread.", ""]
    return out


def _arm64_lines(arm: list) -> list[str]:
    """x86 against ARM (toolchain.evaluate.arm64), when the recipe asked for it."""
    if not arm:
        return []
    rows = [[p["artifact"], "-", "-", "-", "-", "-", p["skipped"]] if "skipped" in p else
            [p["artifact"], f"{p['identical_outputs']}/{p['outputs']}", _num(p.get("max_step_diff"), 0),
             _pct(p.get("agreement_arm_x86")), _pct(p.get("agreement_arm_float")), _pct(p.get("agreement_x86_float")),
             _verdict(p.get("passed", True))] for p in arm]
    cpu = arm[0].get("cpu", "max")
    return ["### x86 against ARM", "",
            f"Each .tflite on XNNPACK's aarch64 kernels (qemu user-mode emulation, CPU model {cpu}) and on x86, "
            f"{arm[0].get('num')} sampled inputs; step differences are in int8 output steps.", "",
            _table(["artifact", "identical outputs", "max step diff", "agreement ARM / x86",
                    "agreement ARM / float", "agreement x86 / float", "verdict"], rows), ""]


def _users_section(core: Mapping) -> list[str]:
    users = core.get("users", [])
    if core.get("kind") != "verifier" or not users:
        return []
    by_user: dict[str, list[str]] = {}
    for a in core.get("artifacts", []):
        if a.get("user") is not None:
            by_user.setdefault(str(a["user"]), []).append(Path(a["path"]).name)
    rows = [[u["user"], _num(u.get("threshold"), 4), _pct(_accuracy_percent(u.get("accuracy"))),
             _pct(_accuracy_percent(u.get("tar"))), _pct(_accuracy_percent(u.get("far"))),
             _num(u.get("probes")), ", ".join(by_user.get(str(u["user"]), [])) or NOT_EXPORTED]
            for u in users]
    return ["## Enrolled users", "",
            _table(["user", "threshold (logit)", "accuracy", "TAR", "FAR", "probes", "artifacts"], rows), ""]


def _comparison_section(core: Mapping) -> list[str]:
    comp = core.get("comparison", [])
    if not comp:
        return []
    rows = [[c["model"], _count(c.get("params")), _count(c.get("macs")),
             NOT_EXPORTED if c.get("int8_bytes") is None else _count(c["int8_bytes"]) + " B",
             _latency(c.get("latency_ms")),
             "not evaluated" if c.get("accuracy") is None else _pct(_accuracy_percent(c["accuracy"]))]
            for c in comp]
    title = ("## Per-user route against the backbones" if core.get("kind") == "verifier"
             else "## This model against the zoo")
    return [title, "",
            "Counts from profiling each float graph (multiply-adds; FLOPs = 2 x MACs). Size, latency and "
            "accuracy only where this run exported and evaluated the model.", "",
            _table(["model", "params", "multiply-adds", "int8 size", "int8 latency (ms)", "accuracy"], rows), ""]


def _latency(v: Any) -> str:
    if v is None or v == {}:
        return NOT_EXPORTED
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {_num(x)}" for k, x in v.items())
    return _num(v)


def _artifacts_section(core: Mapping) -> list[str]:
    arts = core.get("artifacts", [])
    if not arts:
        return []
    rows = [[f"`{a['path']}`", a.get("format"), a.get("precision"), _num(a.get("bytes")), a["sha256"][:16]]
            for a in arts]
    headers = ["path", "format", "precision", "bytes", "sha256 (first 16)"]
    if any("outside" in a for a in arts):
        # What the export checks found left out of int8 / of the XNNPACK delegate (e.g. PReLU in float).
        headers.append("kept float / outside XNNPACK")
        for row, a in zip(rows, arts):
            left = a.get("outside")
            row.append("n/a" if left is None else ", ".join(f"{k} x{v}" for k, v in left.items()) or "none")
    return ["## Artifacts", "", _table(headers, rows), ""]


def _run_section(core: Mapping) -> list[str]:
    timings = core.get("timings", {})
    out = ["## Run", "", f"Recipe `{core.get('name')}`, hash `{str(core.get('recipe_hash'))[:16]}`.", ""]
    cpu = core.get("cpu_timings", {})
    if timings:
        out += [_table(["stage", "wall seconds (when it ran)", "CPU seconds"],
                       [[k, f"{v:.1f}", f"{cpu[k]:.1f}" if k in cpu else "n/a"] for k, v in timings.items()]), "",
                f"Total: {sum(timings.values()):.1f} s wall. CPU seconds count every thread and finished child "
                "process; on a shared machine they are the steadier measure.", ""]
    env = core.get("environment") or {}
    if env.get("cpu"):
        out += [f"Machine: {describe_cpu(env['cpu'])}; CUDA: {', '.join(env.get('cuda') or []) or 'none'}; "
                f"Python {env.get('python')}.", ""]
    versions = core.get("versions", {})
    if versions:
        out += [_table(["tool", "version"], [[k, v or "not installed"] for k, v in versions.items()]), ""]
    return out


def _latency_cpu(core: dict) -> str:
    cpu = core.get("latency_cpu") or (core.get("environment") or {}).get("cpu")
    return describe_cpu(cpu) if cpu else "the machine that ran the parity stage"


# --------------------------------------------------------------------------------------- public


def roc_from_scores(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, dtype=float))
    return fpr, tpr


def write_report(core: Mapping, out_dir: Path, scores: Optional[Mapping[str, Mapping]] = None,
                 roc_fn: Callable = roc_from_scores) -> list[Path]:
    """Write report.md, report.html and the PNG plots; returns every path written.

    `scores`: per artifact {"labels", "float", "artifact"} on the same inputs (parity scatter, ROC).
    """
    out_dir = Path(out_dir)
    plot_dir = out_dir / PLOTS_DIR
    written: list[Path] = []

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, out_dir)).as_posix()

    budget_png = scatter_png = roc_png = None
    if core.get("budgets"):
        written.append(plots.budget_bars(core["budgets"], plot_dir / "budgets.png"))
        budget_png = rel(written[-1])
    if scores:
        written.append(plots.parity_scatter(scores, plot_dir / "parity_scatter.png"))
        scatter_png = rel(written[-1])
        curves: dict[str, tuple] = {}
        for name, s in scores.items():
            # float curves of artifacts built from the same model on the same inputs coincide;
            # keep one per distinct input set (the artifact's source).
            src = s.get("source", "float")
            curves.setdefault(f"float ({src})" if src != "float" else "float", roc_fn(s["labels"], s["float"]))
            curves[name] = roc_fn(s["labels"], s["artifact"])
        written.append(plots.roc_curves(curves, plot_dir / "roc.png"))
        roc_png = rel(written[-1])

    sensitivity_png = None
    sens = (core.get("int8_recovery") or {}).get("sensitivity")
    if sens and sens.get("layers"):
        kept = ((core.get("int8_recovery") or {}).get("fallback") or {}).get("float_layers", [])
        written.append(plots.int8_sensitivity([r for r in sens["layers"] if r.get("cosine_mean") is not None],
                                              sens["all_int8"]["cosine_mean"], kept,
                                              plot_dir / "int8_sensitivity.png"))
        sensitivity_png = rel(written[-1])

    title = (core.get("recipe", {}).get("report", {}) or {}).get("title") or f"Run report: {core.get('name')}"
    verdict = "PASSED" if core.get("passed") else "FAILED"
    lines = [f"# {title}", "", f"**Verdict: {verdict}** ({core.get('kind')} recipe)", ""]
    for f in core.get("failures", []):
        lines.append(f"- {f}")
    if core.get("failures"):
        lines.append("")
    lines += _budget_section(core, budget_png)
    lines += _evaluation_section(core)
    lines += _parity_section(core, scatter_png, roc_png)
    lines += _int8_recovery_section(core, sensitivity_png)
    lines += _users_section(core)
    lines += _comparison_section(core)
    lines += _artifacts_section(core)
    lines += _run_section(core)
    text = "\n".join(lines).rstrip() + "\n"

    md_path = out_dir / "report.md"
    _write_text(md_path, text)
    body = md_lib.markdown(text, extensions=["tables", "fenced_code"])
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
    html_path = out_dir / "report.html"
    _write_text(html_path, page)
    return [md_path, html_path, *written]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{font-size:90%}")
