"""One recipe run with several seeds, summarised: what varies from seed to seed, as mean ± std.

A recipe's float accuracy and its int8 files' parity move with the training seed and the export
seed (calibration images, QAT batches), so one run's verdict is one draw. `summarize_seeds` reads
the run manifests of the same recipe run with different seeds (`benchmarks/bench_recipe_seeds.py`
makes them) and returns, per seed and as mean ± sample std (ddof=1) over the seeds:
- the float model's accuracy on the recipe's pairs or probes (parity's float reference);
- for each artifact: decision agreement and the flipped decisions it is made of, accuracy drop,
  TAR@FAR=1e-3 drop, embedding cosine mean and min (embedding models), the score's shift and
  noise against float (runs made before parity measured them have none), whether its parity
  bounds held, and the person of its lowest-cosine pair image where parity named one (the same
  person at every seed says the minimum bound hinges on that person's images);
- whether the whole run passed (budgets and parity: the run's exit 0).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from toolchain.errors import ToolchainError

# Parity columns summarised per artifact (manifest key -> its name in the summary).
PARITY_METRICS = {
    "decision_agreement": "agreement",
    "accuracy_drop": "accuracy_drop",
    "tar_drop": "tar_drop",
    "embedding_cosine_mean": "cosine_mean",
    "embedding_cosine_min": "cosine_min",
    "score_shift": "score_shift",
    "score_noise": "score_noise",
}


def _stats(values: list) -> dict:
    """{"values", "mean", "std"} of the values present (None where a seed has none); std is the
    sample std (ddof=1), None with fewer than two values."""
    present = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {"values": values,
            "mean": float(present.mean()) if len(present) else None,
            "std": float(present.std(ddof=1)) if len(present) > 1 else None}


def _slot(file: str) -> str:
    """The file a seed's artifact stands for: a `_int8_mixed` file (the fallback kept units in
    float) is that seed's `_int8` file, so the seeds' int8 files line up whatever each kept."""
    return file.replace("_int8_mixed.", "_int8.")


def seed_result(manifest: Mapping) -> dict:
    """One run's manifest -> {"passed", "float_accuracy", "artifacts": {slot: {metric: value}}},
    each slot's values with the "file" it was (`_slot`)."""
    rows = manifest.get("parity") or []
    if not rows:
        raise ToolchainError(f"run {manifest.get('name', '?')!r} has no parity rows: was its parity stage run?")
    artifacts = {}
    for row in rows:
        values = {name: row.get(key) for key, name in PARITY_METRICS.items()}
        # The agreement is a share of `num` decisions; the count is what a bound allows (99.5% of 1,200: 6).
        values["flips"] = int(round((100.0 - row["decision_agreement"]) / 100.0 * row["num"]))
        values["passed"] = bool(row.get("passed"))
        values["file"] = row["file"]
        lowest = row.get("embedding_cosine_lowest") or [{}]
        values["lowest_person"] = lowest[0].get("person")
        artifacts[_slot(row["file"])] = values
    return {"passed": bool(manifest.get("passed")), "float_accuracy": float(rows[0]["float_accuracy"]),
            "artifacts": artifacts}


def summarize_seeds(manifests: Mapping[int, Mapping]) -> dict:
    """{seed: manifest} of one recipe -> {"seeds", "passed", "float_accuracy", "artifacts"}:
    per-seed values with their mean and std (`_stats`), and "passed" per seed for the run and for
    each artifact's parity; each artifact's "files" are the seeds' own. Every run must be of the same recipe name."""
    if not manifests:
        raise ToolchainError("no runs to summarise")
    names = {m.get("name") for m in manifests.values()}
    if len(names) != 1:
        raise ToolchainError(f"the runs are of different recipes: {sorted(map(str, names))}")
    seeds = sorted(manifests)
    results = [seed_result(manifests[s]) for s in seeds]
    files = list(dict.fromkeys(f for r in results for f in r["artifacts"]))
    artifacts = {}
    for f in files:
        per_seed = [r["artifacts"].get(f, {}) for r in results]
        entry = {name: _stats([p.get(name) for p in per_seed]) for name in (*PARITY_METRICS.values(), "flips")}
        entry["passed"] = [bool(p.get("passed")) for p in per_seed]
        entry["files"] = [p.get("file") for p in per_seed]
        entry["lowest_person"] = [p.get("lowest_person") for p in per_seed]
        # Named as the seeds' files were: "m_int8[_mixed].pte" where some kept float units and some not.
        named = {x for x in entry["files"] if x}
        artifacts[named.pop() if len(named) == 1 else f.replace("_int8.", "_int8[_mixed].")] = entry
    return {"recipe": names.pop(), "seeds": seeds, "passed": [r["passed"] for r in results],
            "float_accuracy": _stats([r["float_accuracy"] for r in results]), "artifacts": artifacts}


def mean_std(stats: Mapping, digits: int = 2) -> str:
    """'mean ± std' (or the one value) of a `_stats` entry, for tables; '-' when empty."""
    if stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _person(person) -> str:
    return "" if person is None else f" ({person})"


def seed_table(summary: Mapping):
    """A rich Table of `summarize_seeds` (plus "cpu" and "exit_codes" where given): one block of
    rows per seed, then mean ± std and how many seeds passed."""
    from rich.table import Table

    seeds, exits = summary["seeds"], summary.get("exit_codes") or {}
    title = f"{summary['recipe']}: {len(seeds)} seeds" + (f"; {summary['cpu']}" if summary.get("cpu") else "")
    table = Table(title=title)
    for col in ("seed", "exit", "float accuracy %", "artifact", "agreement % (flips)", "accuracy drop",
                "TAR@1e-3 drop", "cosine mean / min (person)", "score shift / noise", "parity"):
        # The file name is what tells the .pte from the .tflite: never cut it short.
        table.add_column(col, justify="left" if col == "artifact" else "right", no_wrap=col == "artifact",
                         min_width=max(map(len, summary["artifacts"])) if col == "artifact" else None)
    for i, seed in enumerate(seeds):
        for j, (name, a) in enumerate(summary["artifacts"].items()):
            first = j == 0
            agreement = a["agreement"]["values"][i]
            table.add_row(str(seed) if first else "", str(exits.get(seed, "-")) if first else "",
                          _num(summary["float_accuracy"]["values"][i]) if first else "", name,
                          "-" if agreement is None else f"{agreement:.2f} ({a['flips']['values'][i]})",
                          _num(a["accuracy_drop"]["values"][i]), _num(a["tar_drop"]["values"][i]),
                          f"{_num(a['cosine_mean']['values'][i], 4)} / {_num(a['cosine_min']['values'][i], 4)}"
                          + _person(a["lowest_person"][i]),
                          f"{_num(a['score_shift']['values'][i], 4)} / {_num(a['score_noise']['values'][i], 4)}",
                          "pass" if a["passed"][i] else "FAIL")
        table.add_section()
    n = len(seeds)
    for j, (name, a) in enumerate(summary["artifacts"].items()):
        first = j == 0
        table.add_row("mean ± std" if first else "", f"{sum(summary['passed'])}/{n} passed" if first else "",
                      mean_std(summary["float_accuracy"]) if first else "", name,
                      f"{mean_std(a['agreement'])} ({mean_std(a['flips'], 1)})", mean_std(a["accuracy_drop"]),
                      mean_std(a["tar_drop"]), f"{mean_std(a['cosine_mean'], 4)} / {mean_std(a['cosine_min'], 4)}",
                      f"{mean_std(a['score_shift'], 4)} / {mean_std(a['score_noise'], 4)}",
                      f"{sum(a['passed'])}/{n} pass")
    return table
