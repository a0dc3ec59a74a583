"""`toolchain train backbone|hypernet`, `toolchain enroll`, `toolchain evaluate pairs|ablation`.

Thin: parse, build the config, call toolchain.train / toolchain.evaluate, print. Heavy imports
stay inside the commands so that `toolchain --help` is fast. Training commands run unchanged
under `torchrun --nproc_per_node=N -m toolchain train backbone ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from toolchain.cli.common import check_output_file, logged

from toolchain.errors import ToolchainError

SYNTHETIC = "synthetic"


# -- shared helpers ----------------------------------------------------------------------------
def _config(cls, config_file: str | None, sets: tuple[str, ...], **fixed):
    """A pydantic config from an optional YAML file, `--set key=value` overrides (values parsed
    as YAML) and fixed fields from dedicated options; validation errors become one line."""
    import yaml
    from pydantic import ValidationError

    data: dict = {}
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ToolchainError(f"{config_file}: cannot read config ({str(exc).splitlines()[0]})") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ToolchainError(f"{config_file}: a config file must hold a mapping")
        data.update(loaded or {})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ToolchainError(f"--set {item!r}: expected key=value")
        target = data
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ToolchainError(f"--set {item!r}: {p} is a value, not a section")
        try:
            target[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ToolchainError(f"--set {item!r}: value is not valid YAML ({str(exc).splitlines()[0]})") from exc
    data.update({k: v for k, v in fixed.items() if v is not None})
    try:
        return cls(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or cls.__name__
        raise ToolchainError(f"config {where}: {err['msg']}") from exc


def _benchmark(identities: int | None):
    from toolchain.data.synthetic import default_benchmark

    return default_benchmark(**({"train_identities": identities} if identities else {}))


def _dataset(data: str, workers: int = 2, identities: int | None = None):
    """An identity data set: the default synthetic benchmark's training split (optionally with
    `identities` training identities), or a path (RecordIO folder or image folder) read by
    toolchain.data.load_identity_dataset."""
    if data == SYNTHETIC:
        from toolchain.data.datasets import SyntheticIdentityDataset

        return SyntheticIdentityDataset(_benchmark(identities), workers=workers)
    from toolchain.data import load_identity_dataset

    return load_identity_dataset(data)


def _pairs(pairs: str, workers: int = 2, identities: int | None = None):
    """Verification pairs: a file/folder `toolchain.data.load_pairs` reads, or the synthetic
    benchmark's held-out pairs (identities and families never used for training)."""
    if pairs == SYNTHETIC:
        return _benchmark(identities).verification_pairs(workers=workers)
    from toolchain.data import load_pairs

    return load_pairs(pairs)


_config_opts = [
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file with config fields."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config field (repeatable)."),
]


def _with_config(f):
    for opt in reversed(_config_opts):
        f = opt(f)
    return f


# -- train -------------------------------------------------------------------------------------
@click.group()
def train() -> None:
    """Train the backbone h_bb or the hypernetwork h_gen."""


@train.command("backbone")
@click.option("--data", default=SYNTHETIC, show_default=True,
              help="'synthetic' (default benchmark's training identities), a RecordIO folder or an image folder.")
@click.option("--out", "out_dir", default="artifacts/backbone", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", default=None, help="Zoo embedding model (default: config's, mobilefacenet).")
@click.option("--epochs", type=int, default=None)
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="Backbone checkpoint to distil from (angular distillation, weight 7).")
@click.option("--generations", type=click.IntRange(min=1), default=None, help="Recursive distillation generations.")
@click.option("--synthetic-identities", type=int, default=None,
              help="With --data synthetic: training identities (default: the benchmark's 400).")
@click.option("--no-resume", is_flag=True, help="Start over even if OUT holds an interrupted run.")
@_with_config
@logged("train_backbone.log")
def train_backbone_cmd(data, out_dir, model, epochs, teacher, generations, synthetic_identities, no_resume,
                       config_file, sets) -> None:
    """Train a zoo embedding model with an ArcFace head (plain or under torchrun)."""
    from toolchain.train import BackboneConfig, train_backbone

    extra = list(sets)
    if teacher:
        extra.append(f"distill.teacher={teacher}")
    if generations:
        extra.append(f"distill.generations={generations}")
    cfg = _config(BackboneConfig, config_file, tuple(extra), model=model, epochs=epochs)
    path = train_backbone(cfg, _dataset(data, identities=synthetic_identities), out_dir, resume=not no_resume)
    click.echo(str(path))


@train.command("hypernet")
@click.option("--backbone", "backbone_ckpt", required=True, type=click.Path(dir_okay=False),
              help="Backbone checkpoint (from `toolchain train backbone`).")
@click.option("--data", default=SYNTHETIC, show_default=True, help="Identity data set, as for `train backbone`.")
@click.option("--out", "out_dir", default="artifacts/hypernet", show_default=True, type=click.Path(file_okay=False))
@click.option("--steps", type=int, default=None)
@click.option("--synthetic-identities", type=int, default=None,
              help="With --data synthetic: training identities (default: the benchmark's 400).")
@click.option("--no-resume", is_flag=True)
@_with_config
@logged("train_hypernet.log")
def train_hypernet_cmd(backbone_ckpt, data, out_dir, steps, synthetic_identities, no_resume, config_file, sets) -> None:
    """Train h_gen on a frozen backbone; writes OUT/hypernet.pt (all enrollment needs)."""
    from toolchain.train import HypernetConfig, train_hypernet

    cfg = _config(HypernetConfig, config_file, sets, steps=steps)
    path = train_hypernet(cfg, backbone_ckpt, _dataset(data, identities=synthetic_identities), out_dir,
                          resume=not no_resume)
    click.echo(str(path))


# -- enroll ------------------------------------------------------------------------------------
@click.command()
@click.option("--hypernet", "hypernet_ckpt", required=True, type=click.Path(dir_okay=False),
              help="Hypernet checkpoint (from `toolchain train hypernet`).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Enrollment image (aligned 112x112 crop); repeat for several (embeddings are averaged).")
@click.option("--users", "users_dir", type=click.Path(file_okay=False),
              help="Batch mode: a folder with one sub-folder of images per user.")
@click.option("--user", default=None, help="User name stored in enrollment.json (default: OUT's name).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="User folder (single) or parent of the user folders (batch).")
@logged("enroll.log")
def enroll(hypernet_ckpt, images, users_dir, user, out_dir) -> None:
    """Write a user's verifier (verifier.pt) and its decision threshold (enrollment.json)."""
    from toolchain.train.enroll import enroll_folder, enroll_images, read_images

    if bool(images) == bool(users_dir):
        raise ToolchainError("give either --image (one user) or --users (a folder of users)")
    if user is not None and not user.strip():
        raise ToolchainError("--user: an empty name (leave it out to use OUT's folder name)")
    if users_dir:
        written = enroll_folder(hypernet_ckpt, users_dir, out_dir)
        click.echo(f"enrolled {len(written)} users into {out_dir}")
        return
    path = enroll_images(hypernet_ckpt, read_images(images), out_dir, user=user)
    meta = json.loads((Path(path) / "enrollment.json").read_text())
    click.echo(f"{path}: threshold {meta['threshold']:.4f} ({meta['num_images']} image(s))")


# -- evaluate ----------------------------------------------------------------------------------
@click.group()
def evaluate() -> None:
    """Per-user verifiers against backbone cosine; the ablation table."""


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


@evaluate.command("pairs")
@click.option("--hypernet", "hypernet_ckpt", required=True, type=click.Path(dir_okay=False))
@click.option("--pairs", default=SYNTHETIC, show_default=True,
              help="Verification pair set (.bin, pairs file, ...) or 'synthetic' (held-out identities).")
@click.option("--synthetic-identities", type=int, default=None,
              help="With --pairs synthetic: training identities of the benchmark the hypernet was trained on.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics as JSON.")
@click.option("--scores", is_flag=True, help="Include the raw scores in the JSON.")
@logged("evaluate.log", None)
def evaluate_pairs_cmd(hypernet_ckpt, pairs, synthetic_identities, json_out, scores) -> None:
    """Per-user f(b; theta_a), its symmetric variant and backbone cosine on the same pairs."""
    from rich.console import Console
    from rich.table import Table

    from toolchain.evaluate.per_user import ROUTES, evaluate_pairs, to_jsonable
    from toolchain.atomic import atomic_write_bytes

    check_output_file(json_out)
    result = evaluate_pairs(hypernet_ckpt, _pairs(pairs, identities=synthetic_identities))
    table = Table(title=f"{result['num_pairs']} pairs ({pairs})")
    for col in ("route", "accuracy %", "std", "AUC", "EER %", "TAR@FAR=1e-3"):
        table.add_column(col, justify="right" if col != "route" else "left")
    for route in ROUTES:
        m = result[route]
        table.add_row(route, _pct(m["accuracy"]), _pct(m["accuracy_std"]), f"{m['auc']:.4f}", _pct(m["eer"]),
                      _pct(m["tar_at_far"]["1e-3"]))
    console = Console()
    console.print(table)
    t = result["per_user_at_threshold"]
    console.print(f"per-user at the calibrated threshold {t['threshold']:.4f}: accuracy {_pct(t['accuracy'])}%, "
                  f"TAR {_pct(t['tar'])}%, FAR {_pct(t['far'])}%")
    if json_out:
        text = json.dumps(to_jsonable(result, with_scores=scores), indent=2)
        atomic_write_bytes(json_out, lambda tmp: Path(tmp).write_text(text))


@evaluate.command("ablation")
@click.option("--backbone", "backbone_ckpt", type=click.Path(dir_okay=False), default=None,
              help="Backbone checkpoint; default: train the demo backbone into OUT/backbone.")
@click.option("--data", default=SYNTHETIC, show_default=True, help="Identity data set for training.")
@click.option("--pairs", default=SYNTHETIC, show_default=True, help="Verification pairs to score on.")
@click.option("--out", "out_dir", default="artifacts/ablation", show_default=True, type=click.Path(file_okay=False))
@click.option("--variants", default=None,
              help="Comma-separated, or 'default' (full,no-kcs,no-norm-penalty,no-schedule) or 'redesign' "
                   "(full,film,cohort-norm,film+cohort-norm).")
@click.option("--steps", type=int, default=None, help="Hypernet steps of every variant.")
@click.option("--synthetic-identities", type=int, default=None,
              help="Training identities of the synthetic benchmark (default: its 400); the held-out pair "
                   "identities follow them.")
@click.option("--no-resume", is_flag=True)
@_with_config
@logged("ablation.log")
def evaluate_ablation_cmd(backbone_ckpt, data, pairs, out_dir, variants, steps, synthetic_identities, no_resume,
                          config_file, sets) -> None:
    """Train the hypernet with KCS, the norm penalty and the schedule each switched off (same seed,
    steps and data), score each on the pairs, print the table and write OUT/ablation.json."""
    from rich.console import Console
    from rich.table import Table

    from toolchain.train import BackboneConfig, HypernetConfig, run_ablation, train_backbone
    from toolchain.train.ablation import DEFAULT_VARIANTS, REDESIGN_VARIANTS, VARIANTS

    cfg = _config(HypernetConfig, config_file, sets, steps=steps)
    named = {"default": DEFAULT_VARIANTS, "redesign": REDESIGN_VARIANTS}
    names = (named.get(variants) or tuple(v.strip() for v in variants.split(","))) if variants else DEFAULT_VARIANTS
    unknown = [v for v in names if v not in VARIANTS]  # now, not after the data and backbone
    if unknown:
        raise ToolchainError(f"--variants: unknown {', '.join(unknown)}; known: default, redesign, "
                             f"{', '.join(VARIANTS)}")
    dataset = _dataset(data, identities=synthetic_identities)
    if backbone_ckpt is None:
        backbone_ckpt = train_backbone(BackboneConfig(), dataset, Path(out_dir) / "backbone", resume=not no_resume)
    pair_set, identities = pairs, None  # a path: run_ablation reads the identities beside it
    if pairs == SYNTHETIC:  # the generator knows who is in each pair
        pair_list = _benchmark(synthetic_identities).pair_list()
        pair_set, identities = _pairs(pairs, identities=synthetic_identities), (pair_list[:, 0], pair_list[:, 2])
    rows = run_ablation(cfg, backbone_ckpt, dataset, pair_set, out_dir, variants=names, resume=not no_resume,
                        identities=identities)
    table = Table(title=f"hypernet ablation ({pairs}; {cfg.steps} steps, seed {cfg.seed})")
    for col in ("variant", "per-user acc %", "symmetric acc %", "backbone cos acc %", "trunk cos acc %",
                "upper bound acc %", "per-user AUC", "backbone AUC", "per-user TAR@1e-3 %", "acc @ calibrated thr %",
                "train s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{_pct(r['per_user_accuracy'])} ± {_pct(r['per_user_accuracy_std'])}",
                      _pct(r["symmetric_accuracy"]), _pct(r["backbone_accuracy"]), _pct(r["trunk_cosine_accuracy"]),
                      _pct(r["upper_bound_accuracy"]) if "upper_bound_accuracy" in r else "-",
                      f"{r['per_user_auc']:.4f}", f"{r['backbone_auc']:.4f}", _pct(r["per_user_tar_at_far"]["1e-3"]),
                      _pct(r["accuracy_at_calibrated_threshold"]),
                      "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}")
    Console().print(table)
    click.echo(str(Path(out_dir) / "ablation.json"))
