"""The stage runner: ordered stages, content-hash caching, resumable runs.

Each stage declares the recipe section it depends on (`config`), the earlier stages whose files it
reads (`after`) and, optionally, outside files (`external`). Its cache key is the hash of that
config plus the sha256 of every input file. A finished stage writes `DIR/.stages/<name>.json`
with the key, the sha256 of its outputs and a JSON-able `data` record that later stages (and the
manifest) read. On the next run a stage is skipped when its key is unchanged and its outputs are
still on disk with the recorded hashes.

Interruption: a stage marks itself "running" (with its key) before it starts. If the run dies,
the next run finds that marker: with the same key the stage's work folder is kept, so training
resumes from its checkpoints; with a different key the folder is cleared first, so a checkpoint
of another config is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console

from toolchain.console import own_stderr
from toolchain.atomic import write_json_atomic
from toolchain.errors import ToolchainError
from toolchain.recipe import Recipe, content_hash

STAGES_DIR = ".stages"
# Files larger than this outside the run folder (a user's train.rec) are fingerprinted by
# size and mtime instead of being read in full on every run.
_EXTERNAL_FULL_HASH_LIMIT = 64 * 1024 * 1024


@dataclass
class StageOutput:
    """What a stage returns: the files it wrote (under the run folder) and a JSON-able record."""

    files: list[Path] = field(default_factory=list)
    data: dict = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    run: Callable[["RunContext"], StageOutput]
    config: Callable[["RunContext"], Any] = lambda ctx: None  # what the stage depends on
    after: tuple[str, ...] = ()
    external: Callable[["RunContext"], list[Path]] = lambda ctx: []
    workdir: Optional[str] = None  # relative folder the stage owns (cleared when its key changes)
    title: str = ""
    version: int = 1  # bump when the stage's code changes what it writes


@dataclass
class StageReport:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float  # this invocation
    original_seconds: float  # when the stage last actually ran


class RunContext:
    """What a stage sees: the recipe, the run folder, earlier stages' records."""

    def __init__(self, recipe: Recipe, out_dir: Path, console: Console) -> None:
        self.recipe = recipe
        self.out_dir = out_dir
        self.console = console
        self.results: dict[str, dict] = {}
        # seconds each stage took when it last actually ran (stable across cached runs)
        self.timings: dict[str, float] = {}
        self.cpu_timings: dict[str, float] = {}

    def path(self, rel: str | Path) -> Path:
        return self.out_dir / rel

    def rel(self, path: str | Path) -> str:
        """A path relative to the run folder (records never hold absolute paths of the run)."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.out_dir.resolve()).as_posix()
        except ValueError:
            return str(p)

    def workdir(self, stage: str) -> Path:
        return self.out_dir / stage


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    # Own copy rather than toolchain.export's: importing that package pulls in torch, and
    # `toolchain check DIR` should not pay for it.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]


def _external_fingerprint(path: Path) -> str:
    st = path.stat()
    if st.st_size <= _EXTERNAL_FULL_HASH_LIMIT:
        return sha256_file(path)
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (render workers, converters): on a
    shared machine it says what a stage costs better than the wall time does."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Pipeline:
    """Runs stages in order with caching; `reports` says which ran and which were skipped."""

    def __init__(self, stages: list[Stage], recipe: Recipe, out_dir: Path,
                 console: Optional[Console] = None) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names: {names}")
        for i, s in enumerate(stages):
            missing = [a for a in s.after if a not in names[:i]]
            if missing:
                raise ValueError(f"stage {s.name!r} runs after unknown/later stages {missing}")
        self.stages = stages
        self.out_dir = Path(out_dir)
        self.console = console or Console(file=own_stderr)
        self.ctx = RunContext(recipe, self.out_dir, self.console)
        self.reports: list[StageReport] = []
        self.output_hashes: dict[str, dict[str, str]] = {}

    # -- cache key -----------------------------------------------------------------------------
    def _key(self, stage: Stage) -> tuple[str, dict[str, str]]:
        inputs: dict[str, str] = {}
        for dep in stage.after:
            inputs.update(self.output_hashes.get(dep, {}))
        for ext in stage.external(self.ctx):
            ext = Path(ext)
            if not ext.exists():
                raise ToolchainError(f"stage {stage.name}: input {ext} does not exist")
            for f in _files_under(ext):
                inputs[str(f.resolve())] = _external_fingerprint(f)
        config = stage.config(self.ctx)
        from toolchain import __version__  # a new release may write other files: redo the work

        key = content_hash({"stage": stage.name, "version": stage.version, "toolchain": __version__,
                            "config": config, "inputs": inputs})
        return key, inputs

    def _outputs_intact(self, record: dict) -> bool:
        for rel, digest in record.get("outputs", {}).items():
            p = self.out_dir / rel
            if not p.is_file() or sha256_file(p) != digest:
                return False
        return True

    # -- running ---------------------------------------------------------------------------------
    def run(self, only_until: Optional[str] = None) -> list[StageReport]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state_dir = self.out_dir / STAGES_DIR
        state_dir.mkdir(exist_ok=True)
        n = len(self.stages)
        for i, stage in enumerate(self.stages, 1):
            label = f"[{i}/{n}] {stage.title or stage.name}"
            key, inputs = self._key(stage)
            record_path = state_dir / f"{stage.name}.json"
            record = read_json(record_path)
            if (record and record.get("status") == "done" and record.get("key") == key
                    and self._outputs_intact(record)):
                self._accept(stage, record, "skipped", 0.0)
                self.console.print(f"[dim]{label}: unchanged, skipped[/dim]")
                continue
            self._prepare_workdir(stage, record, key)
            write_json_atomic(record_path, {"stage": stage.name, "status": "running", "key": key})
            self.console.print(f"[bold]{label}[/bold]: running ...")
            t0, c0 = time.perf_counter(), _cpu_seconds()
            out = stage.run(self.ctx)
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            if not isinstance(out, StageOutput):
                raise TypeError(f"stage {stage.name} returned {type(out).__name__}, not StageOutput")
            outputs: dict[str, str] = {}
            for f in out.files:
                for p in _files_under(self.out_dir / f if not Path(f).is_absolute() else Path(f)):
                    rel = self.ctx.rel(p)
                    if Path(rel).is_absolute():
                        raise ValueError(f"stage {stage.name}: output {p} is outside the run folder")
                    outputs[rel] = sha256_file(p)
            record = {"stage": stage.name, "status": "done", "key": key, "inputs": inputs,
                      "outputs": outputs, "data": out.data, "seconds": round(seconds, 3),
                      "cpu_seconds": round(cpu, 3),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_json_atomic(record_path, record)
            self._accept(stage, record, "ran", seconds)
            self.console.print(f"[green]{label}: done[/green] in {seconds:.1f} s")
            if only_until == stage.name:
                break
        return self.reports

    def _prepare_workdir(self, stage: Stage, record: Optional[dict], key: str) -> None:
        if not stage.workdir:
            return
        wd = self.out_dir / stage.workdir
        resumable = record is not None and record.get("status") == "running" and record.get("key") == key
        if wd.exists() and not resumable:
            shutil.rmtree(wd)  # another config's (or a finished run's stale) files: start clean
        wd.mkdir(parents=True, exist_ok=True)

    def _accept(self, stage: Stage, record: dict, status: str, seconds: float) -> None:
        self.ctx.results[stage.name] = record.get("data", {})
        self.ctx.timings[stage.name] = float(record.get("seconds", seconds))
        if "cpu_seconds" in record:
            self.ctx.cpu_timings[stage.name] = float(record["cpu_seconds"])
        self.output_hashes[stage.name] = dict(record.get("outputs", {}))
        self.reports.append(StageReport(stage.name, status, round(seconds, 3),
                                        float(record.get("seconds", seconds))))
