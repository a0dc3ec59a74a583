"""Budget gate: limits per model (or artifact), measured values, verdicts.

A budgets file is a YAML mapping from a subject name to its limits:

    verifier:                 # a registered model name (or set `model:`)
      max_params: 23000
      max_macs: 2500000
      max_flops: 5000000
    verifier-int8-tflite:     # any name; `file:` is resolved against the budgets file's folder
      file: ../artifacts/demo/verifier_int8.tflite
      max_bytes: 60000

Besides limits an entry may set `model` (the registered model to profile; default: the subject
name), `file` (the artifact whose size `max_bytes` bounds) and `input_size` (N for N x N).

Each limit key is registered in `BUDGET_KEYS` with the metric it bounds, its comparison and who
measures it: "profile" (params/macs/flops of the model), "file" (bytes of `file`), or
"pipeline" (latency, parity: the caller passes these values in `measured`). Later stages add
keys with `register_budget_key`. An unknown key is bad input (exit 2), naming key and subject.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError, model_validator

from toolchain.errors import CheckFailed, ToolchainError

# ---------------------------------------------------------------------------------------------
# Known budget keys


@dataclass(frozen=True)
class BudgetKey:
    key: str  # as written in the budgets file, e.g. "max_params"
    metric: str  # the measured value it bounds, e.g. "params"
    compare: str  # "<=" (a maximum) or ">=" (a minimum)
    source: str  # "profile", "file" or "pipeline": who measures the metric
    description: str = ""


BUDGET_KEYS: dict[str, BudgetKey] = {}
_SOURCES = ("profile", "file", "pipeline")


def register_budget_key(
    key: str, metric: str, compare: str, source: str = "pipeline", description: str = ""
) -> BudgetKey:
    """Make `key` valid in budgets files. Registering the same definition twice is a no-op."""
    if compare not in ("<=", ">="):
        raise ValueError(f"compare must be '<=' or '>=', not {compare!r}")
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, not {source!r}")
    new = BudgetKey(key, metric, compare, source, description)
    old = BUDGET_KEYS.get(key)
    if old is not None and (old.metric, old.compare, old.source) != (metric, compare, source):
        raise ValueError(f"budget key {key!r} already registered as {old}")
    BUDGET_KEYS[key] = old or new
    return BUDGET_KEYS[key]


register_budget_key("max_params", "params", "<=", "profile", "parameters of the model")
register_budget_key("max_macs", "macs", "<=", "profile", "multiply-adds, batch 1")
register_budget_key("max_flops", "flops", "<=", "profile", "FLOPs = 2 x multiply-adds")
register_budget_key("max_elementwise_ops", "elementwise_ops", "<=", "profile",
                    "activations, adds, muls, BatchNorm (see toolchain.profile.counting)")
register_budget_key("max_bytes", "bytes", "<=", "file", "size of the file given as `file:`")
register_budget_key("max_latency_ms", "latency_ms", "<=", "pipeline",
                    "median latency of one inference, in the real runtime")
register_budget_key("min_decision_agreement", "decision_agreement", ">=", "pipeline",
                    "fraction of same accept/reject decisions as the float model")
register_budget_key("max_accuracy_drop", "accuracy_drop", "<=", "pipeline",
                    "verification accuracy lost against the float model")  # fmt: skip

# Metrics whose value is a lower bound when the profiler met ops it has no handler for.
_COUNTED_METRICS = ("macs", "flops", "elementwise_ops")
_META_KEYS = ("model", "file", "input_size")

# ---------------------------------------------------------------------------------------------
# The budgets file


class SubjectBudget(BaseModel):
    """The limits of one subject (a model or an artifact) plus how to measure it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str | None = None
    file: str | None = None
    input_size: StrictInt | None = None
    limits: dict[str, Union[StrictInt, StrictFloat]] = {}

    @model_validator(mode="before")
    @classmethod
    def _collect_limits(cls, data: Any) -> Any:
        if data is None:
            raise ValueError("no budget keys")
        if not isinstance(data, dict):
            raise ValueError(f"must be a mapping of budget keys to limits, not {data!r}")
        if "limits" in data:  # already in canonical form (e.g. from model_dump)
            return data
        out: dict[str, Any] = {"limits": {}}
        for k, v in data.items():
            if k in _META_KEYS:
                out[k] = v
            elif k in BUDGET_KEYS:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{k}: limit must be a number, not {v!r}")
                out["limits"][k] = v
            else:
                raise ValueError(
                    f"unknown budget key {k!r} (known: {', '.join(sorted(BUDGET_KEYS))})"
                )
        if not out["limits"]:
            raise ValueError("no budget keys")
        return out

    @model_validator(mode="after")
    def _check(self) -> "SubjectBudget":
        for k, v in self.limits.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{k}: limit must be finite, not {v}")
            if BUDGET_KEYS[k].source == "file" and not self.file:
                raise ValueError(f"{k} needs a `file:` entry naming the artifact")
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(f"input_size must be positive, not {self.input_size}")
        return self


@dataclass
class Budgets:
    subjects: dict[str, SubjectBudget]
    source: str = "<dict>"  # where they came from, for messages
    base_dir: Path = field(default_factory=Path.cwd)  # `file:` paths are relative to this

    def select(self, names: Iterable[str] | None) -> "Budgets":
        names = list(names or [])
        if not names:
            return self
        missing = [n for n in names if n not in self.subjects]
        if missing:
            raise ToolchainError(f"no budgets for {missing[0]!r} in {self.source}")
        return Budgets({n: self.subjects[n] for n in names}, self.source, self.base_dir)


def load_budgets(path_or_dict: Any) -> Budgets:
    """Budgets from a YAML path or an already-parsed mapping; ToolchainError on bad input."""
    import yaml

    if isinstance(path_or_dict, Budgets):
        return path_or_dict
    if isinstance(path_or_dict, dict):
        raw, source, base = path_or_dict, "<dict>", Path.cwd()
    else:
        path = Path(os.fspath(path_or_dict))
        source, base = str(path), path.resolve().parent
        if not path.is_file():
            raise ToolchainError(f"budgets file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ToolchainError(f"{path}: malformed YAML{line}: {problem}") from None
        except UnicodeDecodeError:
            raise ToolchainError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict) or not raw:
        raise ToolchainError(f"{source}: expected a mapping of model names to budgets")
    subjects = {}
    for name, entry in raw.items():
        if not isinstance(name, str):
            raise ToolchainError(f"{source}: model name {name!r} is not a string")
        try:
            subjects[name] = SubjectBudget.model_validate(entry)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"] if p not in ("limits", "int", "float"))
            msg = err["msg"].removeprefix("Value error, ")
            raise ToolchainError(
                f"{source}: model {name!r}: {loc + ': ' if loc else ''}{msg}"
            ) from None
    return Budgets(subjects, source, base)


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class BudgetResult:
    name: str  # "<subject>.<key>", e.g. "verifier.max_params"
    value: float | int | None  # None: not measured
    limit: float | int
    passed: bool
    compare: str = "<="
    metric: str = ""
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        return "pass" if self.passed else "FAIL"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def evaluate_budgets(budgets: Any, measured: dict[str, dict]) -> list[BudgetResult]:
    """Compare every limit with `measured[subject][metric]`; a missing value fails.

    `budgets`: a Budgets or anything `load_budgets` takes. `measured`: per subject, a dict of
    metrics (`params`, `macs`, `flops`, `bytes`, `latency_ms`, ...), e.g. profile_model's output.
    """
    budgets = load_budgets(budgets)
    results = []
    for subject, entry in budgets.subjects.items():
        values = measured.get(subject, {}) or {}
        for key, limit in entry.limits.items():
            spec = BUDGET_KEYS[key]
            value = values.get(spec.metric)
            name = f"{subject}.{key}"
            if value is None:
                note = f"{spec.metric} not measured" + (
                    " (measured by the pipeline: latency/parity stages)"
                    if spec.source == "pipeline" else ""
                )  # fmt: skip
                results.append(BudgetResult(name, None, limit, False, spec.compare, spec.metric, note))
                continue
            ok = value <= limit if spec.compare == "<=" else value >= limit
            note = ""
            unsupported = values.get("unsupported_ops") or {}
            if spec.metric in _COUNTED_METRICS and unsupported:
                # The count is only a lower bound: the budget cannot be shown to hold.
                ok = False
                note = "lower bound; ops without a handler: " + ", ".join(sorted(unsupported))
            results.append(BudgetResult(name, value, limit, bool(ok), spec.compare, spec.metric, note))
    return results


def measure_budgets(budgets: Any) -> dict[str, dict]:
    """Measure what the profiler can: params/MACs of each subject's model, bytes of its file."""
    from toolchain.profile.counting import profile_model
    from toolchain.profile.files import profile_file

    budgets = load_budgets(budgets)
    measured: dict[str, dict] = {}
    for subject, entry in budgets.subjects.items():
        sources = {BUDGET_KEYS[k].source for k in entry.limits}
        values: dict[str, Any] = {}
        if "profile" in sources:
            model = entry.model or subject
            try:
                values.update(profile_model(model, entry.input_size))
            except ToolchainError as exc:
                raise ToolchainError(f"{budgets.source}: {subject}: {exc}") from None
        if "file" in sources:
            path = Path(entry.file)
            path = path if path.is_absolute() else budgets.base_dir / path
            try:
                values.update(profile_file(path))
            except ToolchainError as exc:
                raise ToolchainError(f"{budgets.source}: {subject}: {exc}") from None
        measured[subject] = values
    return measured


def check_budgets(
    budgets: Any, subjects: Iterable[str] | None = None, measured: dict[str, dict] | None = None
) -> list[BudgetResult]:
    """Load, select, measure (profile + files) and evaluate. `measured` adds the pipeline's
    own metrics (latency, parity) per subject; it wins over what is measured here."""
    budgets = load_budgets(budgets).select(subjects)
    values = measure_budgets(budgets)
    for subject, extra in (measured or {}).items():
        values.setdefault(subject, {}).update(extra)
    return evaluate_budgets(budgets, values)


def raise_if_failed(results: list) -> None:
    """CheckFailed naming the failed budgets (exit 1), carrying the rows as `.results`."""
    failed = [r.name for r in results if not r.passed]
    if failed:
        exc = CheckFailed(
            f"{len(failed)} of {len(results)} budgets failed: {', '.join(failed)}"
        )
        exc.results = results
        raise exc
