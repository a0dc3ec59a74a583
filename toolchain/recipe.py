"""Recipes: the validated description of one `toolchain run`.

A recipe is YAML. Every section is a pydantic model with `extra="forbid"`, so a typo is an error
that names its dotted path (`train.hypernet.norm_penalty: unknown key ...`) instead of a setting
silently ignored. Command-line overrides (`key=value`, dotted path, value parsed as a YAML scalar)
are applied to the raw mapping before validation, so they are checked the same way.

The training sections embed the training config models (BackboneConfig, HypernetConfig), so
the recipe and `toolchain train` accept exactly the same keys.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolchain.errors import ToolchainError
from toolchain.evaluate.flips import AGREEMENT_RISK
from toolchain.train.config import BackboneConfig, HypernetConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------- sections


class SyntheticData(_Strict):
    """Arguments of the synthetic generator (toolchain.data.write_synthetic).

    `identities` training identities; held-out verification identities (no identity or
    look-alike family of theirs is seen in training) and the pairs over them. Unset (null)
    fields take the generator's documented defaults.
    """

    identities: int = Field(400, ge=6)
    images_per_identity: int = Field(10, ge=2)
    seed: int = 0
    val_identities: Optional[int] = Field(None, ge=2)
    val_images_per_identity: Optional[int] = Field(None, ge=2)
    pairs: Optional[int] = Field(None, ge=20, multiple_of=20, description="10 folds, half matched")
    family_size: int = Field(4, ge=1)
    hard_negative_fraction: float = Field(0.5, ge=0, le=1)

    def generator_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class DataSection(_Strict):
    """Where the faces come from.

    - synthetic: the embedded generator (`data.synthetic`).
    - insightface: `data.root` holds train.rec/train.idx/property and the verification `.bin`
      named by `data.pairs`.
    - folder: `data.root` is an image folder (one sub-folder per identity). `val_identities`
      (a share < 1 or a count) of its identities are held out of every training stage, and
      `pairs` verification pairs (a count) are built among them, half matched, a share
      `hard_negatives` of the mismatched ones look-alikes in the trained backbone's space.
    """

    source: Literal["synthetic", "insightface", "folder"] = "synthetic"
    # insightface / folder: the data folder.
    root: Optional[str] = None
    # Relative to root (insightface) or to the generated folder (synthetic); null = the default
    # (insightface: train.rec, lfw.bin; synthetic: its train.rec and synthetic.bin).
    train: Optional[str] = None
    pairs: Optional[Union[int, str]] = Field(
        None, description="verification pairs: a file (synthetic, insightface) or a count (folder)")
    val_identities: Optional[float] = Field(None, gt=0, description="folder: held-out identities, share (<1) or count")
    hard_negatives: float = Field(0.5, ge=0, le=1, description="folder: share of mismatched pairs that are look-alikes")
    split_seed: int = Field(0, description="folder: seed of the identity split and of the pairs")
    synthetic: SyntheticData = Field(default_factory=SyntheticData)

    @model_validator(mode="after")
    def _root_for_real_data(self) -> "DataSection":
        if self.source in ("insightface", "folder") and not self.root:
            raise ValueError(f"source '{self.source}' needs data.root (e.g. data.root=/path/to/faces)")
        if self.source == "folder":
            if self.pairs is not None and (not isinstance(self.pairs, int) or self.pairs < 20 or self.pairs % 20):
                raise ValueError("source 'folder' needs data.pairs as a count, a multiple of 20 (10 balanced folds)")
            if self.val_identities is not None and self.val_identities >= 1 \
                    and self.val_identities != int(self.val_identities):
                raise ValueError("data.val_identities: a share below 1 or a whole count")
        elif isinstance(self.pairs, int):
            raise ValueError(f"source '{self.source}' takes data.pairs as a file name")
        return self

    @property
    def pair_count(self) -> int:
        """folder: how many pairs to build (default 1200)."""
        return int(self.pairs) if isinstance(self.pairs, int) else 1200

    @property
    def held_out(self) -> float:
        """folder: held-out identities, share or count (default a fifth)."""
        return 0.2 if self.val_identities is None else self.val_identities

    def files(self) -> tuple[str, str]:
        """(identity data set, verification pairs), relative to the data folder."""
        if self.source == "synthetic":
            return self.train or "train.rec", self.pairs or "synthetic.bin"
        if self.source == "folder":
            return "train.rec", "pairs.bin"  # written into the run folder by the data and pairs stages
        return self.train or "train.rec", self.pairs or "lfw.bin"


class TrainSection(_Strict):
    backbone: Optional[BackboneConfig] = None
    hypernet: Optional[HypernetConfig] = None


class EnrollSection(_Strict):
    users: int = Field(3, ge=1, le=1000, description="identities enrolled from the evaluation set")
    enroll_images: int = Field(1, ge=1, description="enrollment images per user")
    seed: int = 0


class EvaluateSection(_Strict):
    symmetric: bool = True
    max_pairs: Optional[int] = Field(None, ge=2)


Format = Literal["executorch", "tflite"]
Precision = Literal["fp32", "int8"]


class Int8FormatSection(_Strict):
    """One format's own `export.int8` settings (`export.int8.executorch` / `export.int8.tflite`):
    each key set here replaces the section's value for that format's int8 file; null inherits.
    The runtimes round differently, so a recovery method can help one file and not the other
    (docs/int8-backbones.md: measured on MobileFaceNet, not used by a shipped recipe)."""
    calibration: Optional[Literal["mse", "minmax", "percentile"]] = None
    percentile: Optional[float] = Field(None, gt=50, le=100)
    outlier_factor: Optional[float] = Field(None, gt=1)
    bias_correction: Optional[bool] = None
    equalize: Optional[bool] = None
    qat_steps: Optional[int] = Field(None, ge=0, le=100_000)
    qat_lr: Optional[float] = Field(None, gt=0, le=1)
    qat_batch: Optional[int] = Field(None, ge=2, le=512)


class Int8Section(_Strict):
    """int8 accuracy recovery (toolchain.quantize.int8_options): how activation ranges are
    calibrated (every int8 file), whether biases absorb the int8 graph's mean error (PT2E files),
    quantization-aware fine-tuning of an embedding model (both runtimes), and the accuracy-aware
    fallback that keeps the fewest layers in float until the parity bounds hold. `executorch` and
    `tflite` override any of the first eight keys for that format's file alone."""
    calibration: Literal["mse", "minmax", "percentile"] = "mse"
    percentile: float = Field(99.99, gt=50, le=100, description="percentile: the share of values kept in range")
    outlier_factor: Optional[float] = Field(None, gt=1, description="leave out calibration images whose activations "
                                            "exceed this many times the set's median at some layer (null: off)")
    bias_correction: bool = False
    equalize: bool = Field(False, description="cross-layer range equalization (exact in float; every int8 file)")
    qat_steps: int = Field(0, ge=0, le=100_000, description="PT2E QAT steps on the identity images (0: off)")
    qat_lr: float = Field(1e-5, gt=0, le=1, description="QAT learning rate (Adam)")
    qat_batch: int = Field(16, ge=2, le=512, description="QAT images per step")
    fallback: bool = Field(False, description="keep the fewest layers (or blocks) in float until the parity "
                                              "bounds hold: chosen in torch's int8 graph for the .pte, in LiteRT "
                                              "within the int8 size budget for onnx2tf's .tflite")
    max_float_layers: int = Field(8, ge=1, le=1000, description="fallback: most layers (or blocks) kept in float")
    fallback_unit: Literal["layer", "block"] = Field("layer", description="fallback: what it keeps in float, one "
                                                     "conv or linear layer or one block of the model at a time")
    float_layers: list[str] = Field(default_factory=list, description="modules kept in float (names; with "
                                    "fallback off, in both int8 files)")
    full_range_layers: list[str] = Field(default_factory=list, description="modules (blocks or layers) whose "
                                         "activations take the calibration images' full min-max range, whatever "
                                         "`calibration` says (both int8 files)")
    agreement_risk: float = Field(AGREEMENT_RISK, gt=0, lt=1, description="fallback: how often a file it "
                                  "passes may still flip more decisions than parity.min_decision_agreement "
                                  "allows (lower: a quieter file, maybe more in float)")
    executorch: Optional[Int8FormatSection] = None
    tflite: Optional[Int8FormatSection] = None


class ExportSection(_Strict):
    # Embedding route: the zoo model to export; verifier route: the enrolled users' verifiers.
    model: Optional[str] = None
    formats: list[Format] = Field(default_factory=lambda: ["executorch", "tflite"], min_length=1)
    precisions: list[Precision] = Field(default_factory=lambda: ["int8", "fp32"], min_length=1)
    calibration_images: int = Field(64, ge=1)
    tflite_backend: Literal["onnx2tf", "litert-torch"] = "onnx2tf"
    int8: Int8Section = Field(default_factory=Int8Section)
    users: Optional[int] = Field(1, ge=1, description="how many enrolled users to export (null: all)")


class BudgetSection(_Strict):
    """Limits checked on the float graph (counts) and on the exported files (bytes, latency)."""

    max_params: Optional[int] = Field(None, ge=1)
    max_macs: Optional[float] = Field(None, gt=0, description="multiply-adds")
    max_flops: Optional[float] = Field(None, gt=0, description="2 x multiply-adds")
    max_int8_bytes: Optional[int] = Field(None, ge=1)
    max_fp32_bytes: Optional[int] = Field(None, ge=1)
    max_latency_ms: Optional[float] = Field(None, gt=0)


class ParitySection(_Strict):
    max_accuracy_drop: float = Field(0.3, ge=0, description="percentage points")
    min_decision_agreement: float = Field(99.5, ge=0, le=100, description="percent")
    # Optional bounds (null: not checked): TAR at FAR=1e-3 lost, in points; and, for an embedding
    # model, each image's embedding cosine to the float model's (mean over the pairs' images, minimum).
    max_tar_drop: Optional[float] = Field(None, ge=0, description="points of TAR@FAR=1e-3")
    min_embedding_cosine_mean: Optional[float] = Field(None, ge=-1, le=1)
    min_embedding_cosine_min: Optional[float] = Field(None, ge=-1, le=1)
    latency_runs: int = Field(20, ge=1)
    max_pairs: Optional[int] = Field(None, ge=2, description="embedding route: pairs scored per artifact")
    # Verifier route: each user's artifacts run on the user's own probes plus this many
    # verification-pair images as negatives (agreement resolution is 1/(probes)).
    max_negatives: int = Field(1000, ge=2)
    # x86 against ARM: each .tflite also runs on XNNPACK's aarch64 kernels under emulation
    # (`make arm-env`), on a seeded sample of the probes or pairs, because emulation is slow.
    arm64: bool = False
    arm64_sample: int = Field(200, ge=10)
    arm64_cpu: Optional[str] = Field(None, description="qemu CPU model; default max (sdot, i8mm)")


class ReportSection(_Strict):
    title: Optional[str] = None
    compare_backbones: list[str] = Field(
        default_factory=lambda: ["mobilefacenet", "seesawfacenet", "vargfacenet"])


class Recipe(_Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["verifier", "embedding"] = "verifier"
    description: str = ""
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    enroll: EnrollSection = Field(default_factory=EnrollSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export: ExportSection = Field(default_factory=ExportSection)
    budgets: BudgetSection = Field(default_factory=BudgetSection)
    parity: ParitySection = Field(default_factory=ParitySection)
    report: ReportSection = Field(default_factory=ReportSection)

    @model_validator(mode="after")
    def _route(self) -> "Recipe":
        if self.kind == "verifier":
            if self.train.backbone is None or self.train.hypernet is None:
                raise ValueError("kind 'verifier' needs train.backbone and train.hypernet")
        elif self.export.model is None and self.train.backbone is None:
            raise ValueError("kind 'embedding' needs export.model or train.backbone")
        return self

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain JSON types."""
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return content_hash(self.resolved())


# ------------------------------------------------------------------------------------- utilities


def content_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering: equal configs hash equal, whatever the key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _dotted(loc: tuple) -> str:
    # pydantic puts validator/union tags in loc (e.g. 'function-after[...]'); drop them.
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class that holds the last key of `loc`, to list its allowed keys."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = _unwrap(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return annotation


def _describe(err: dict) -> str:
    loc = tuple(err.get("loc", ()))
    path = _dotted(loc) or "recipe"
    kind = err.get("type")
    if kind == "extra_forbidden":
        holder = _model_at(loc)
        allowed = f" (allowed: {', '.join(holder.model_fields)})" if holder else ""
        return f"{path}: unknown key{allowed}"
    if kind == "missing":
        return f"{path}: required key missing"
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {msg}{got_s}"


def parse_overrides(items: list[str] | tuple[str, ...]) -> list[tuple[list[str], Any]]:
    """`a.b.c=value` -> (["a","b","c"], yaml-parsed value). Bad syntax is a ToolchainError."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ToolchainError(f"override {item!r}: expected key=value with a dotted key, e.g. train.backbone.epochs=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ToolchainError(f"override {item!r}: value is not valid YAML ({str(exc).splitlines()[0]})") from exc
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set each dotted key in a copy of the raw mapping (intermediate mappings are created)."""
    data = json.loads(json.dumps(raw))  # deep copy of plain YAML types
    for parts, value in parse_overrides(overrides):
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[part] = nxt
            elif not isinstance(nxt, dict):
                raise ToolchainError(f"override {'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def validate_recipe(raw: Any, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise ToolchainError(f"{source}: a recipe is a YAML mapping, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ToolchainError(f"{source}: {first}{more}") from None


def _resolve_from_recipe(raw: dict, folder: Path) -> None:
    """A checkpoint named in the recipe file is relative to the file, so the recipe runs from any
    directory (a path given as an override stays relative to the working directory)."""
    backbone = (raw.get("train") or {}).get("backbone") if isinstance(raw.get("train"), dict) else None
    if isinstance(backbone, dict) and isinstance(backbone.get("init"), str) and not Path(backbone["init"]).is_absolute():
        backbone["init"] = str((folder / backbone["init"]).resolve())


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, validate. Bad input -> ToolchainError."""
    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ToolchainError(f"{path}: not a text file (not UTF-8), so not a YAML recipe") from exc
    except yaml.YAMLError as exc:
        raise ToolchainError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
        _resolve_from_recipe(raw, path.parent)
    return validate_recipe(apply_overrides(raw, overrides) if isinstance(raw, dict) else raw, str(path))
