"""The ablation: the hypernetwork trained with KCS, the norm penalty and the schedule each switched
off, everything else equal (seed, steps, backbone, data), each scored on the same pairs; and the
redesign's switches (per-user trunk modulation `film`, cohort score normalisation), each on and
off. Every row also carries the trunk's own cosine accuracy, and, when the person of each pair
image is known (a `pair_identities.json` beside the pairs, as runs write), the fitted-head upper
bound (toolchain.evaluate.diagnose).

Also the one-call synthetic benchmark (`synthetic_benchmark`): render the default synthetic data
(training identities + held-out verification pairs), train the demo backbone, then the ablation.
"""

from __future__ import annotations

import json
from pathlib import Path

from toolchain.errors import ToolchainError
from toolchain.atomic import atomic_write_bytes
from toolchain.models.io import load_state
from toolchain.train.config import BackboneConfig, HypernetConfig

# name -> overrides of the base config; "full" is the base itself.
VARIANTS: dict[str, dict] = {
    "full": {},
    "no-kcs": {"kcs": False},
    "no-norm-penalty": {"norm_penalty": 0.0},
    "no-schedule": {"schedule": False},
    # Not part of the default table (not one of the paper's three elements); ask for it by name.
    "no-trunk-distill": {"trunk_distill": 0.0},
    "none": {"kcs": False, "norm_penalty": 0.0, "schedule": False},
    # The redesign's switches (issue: per-user route on real faces).
    "film": {"verifier_kwargs": {"film": True}},
    "cohort-norm": {"cohort_size": 256},
    "film+cohort-norm": {"verifier_kwargs": {"film": True}, "cohort_size": 256},
    "trunk-pretrain": {"trunk_pretrain_steps": 1500},
    "score-distill": {"score_distill": 1.0},
    "score-distill+cohort-norm": {"score_distill": 1.0, "cohort_size": 256},
    "wide": {"verifier_kwargs": {"width": 18, "feature_dim": 128, "hidden_dim": 48}},
}
DEFAULT_VARIANTS = ("full", "no-kcs", "no-norm-penalty", "no-schedule")
REDESIGN_VARIANTS = ("full", "film", "cohort-norm", "film+cohort-norm")


def run_ablation(cfg: HypernetConfig, backbone_ckpt: str | Path, dataset, pairs, out_dir: str | Path,
                 variants=DEFAULT_VARIANTS, resume: bool = True, progress: bool = True,
                 identities=None) -> list[dict]:
    """Train each variant into `out_dir/<variant>/`, evaluate it on `pairs`; returns one row per
    variant and writes them to `out_dir/ablation.json`. `identities`: (person of each side a,
    of each side b) of the pairs, for the upper bound; by default read beside a pairs file."""
    from toolchain.evaluate.per_user import backbone_embeddings, evaluate_pairs
    from toolchain.models.hypernet import load_hypernet
    from toolchain.train.hypernet import train_hypernet

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ToolchainError(f"unknown ablation variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    pairs_path = Path(pairs) if isinstance(pairs, (str, Path)) else None
    if pairs_path is not None:
        from toolchain.data import load_pairs

        pairs = load_pairs(pairs_path)
    if identities is None and pairs_path is not None:
        from toolchain.data.split import read_pair_identities

        identities = read_pair_identities(pairs_path)
    if identities is not None:
        from toolchain.evaluate.diagnose import negative_sample

        negatives = negative_sample(dataset)
    else:
        negatives = None
    out_dir = Path(out_dir)
    rows, pair_emb = [], None
    for name in variants:
        update = dict(VARIANTS[name])
        if "verifier_kwargs" in update:  # on top of the base config's verifier arguments
            update["verifier_kwargs"] = {**cfg.verifier_kwargs, **update["verifier_kwargs"]}
        vcfg = cfg.model_copy(update={**update, "progress": progress})
        # One h_bb embedding cache for all variants (same backbone, same data).
        ckpt = train_hypernet(vcfg, backbone_ckpt, dataset, out_dir / name, resume=resume, cache_dir=out_dir)
        bundle = load_hypernet(ckpt)
        if pair_emb is None:  # the backbone is shared too: embed the pairs once
            pair_emb = backbone_embeddings(bundle, pairs)
        res = evaluate_pairs(bundle, pairs, progress=progress, embeddings=pair_emb)
        payload = load_state(ckpt)
        calib = payload["calibration"]
        diag = _diagnosis(bundle.hypernet, pairs, identities, negatives)
        rows.append({
            **diag, "film": bool(vcfg.verifier_kwargs.get("film", False)), "cohort_size": vcfg.cohort_size,
            "variant": name, "kcs": vcfg.kcs, "norm_penalty": vcfg.norm_penalty, "schedule": vcfg.schedule,
            "trunk_distill": vcfg.trunk_distill, "steps": vcfg.steps, "seed": vcfg.seed,
            "per_user_accuracy": res["per_user"]["accuracy"], "per_user_accuracy_std": res["per_user"]["accuracy_std"],
            "symmetric_accuracy": res["symmetric"]["accuracy"], "backbone_accuracy": res["backbone_cosine"]["accuracy"],
            "per_user_auc": res["per_user"]["auc"], "per_user_eer": res["per_user"]["eer"],
            "per_user_tar_at_far": res["per_user"]["tar_at_far"],
            "symmetric_auc": res["symmetric"]["auc"], "symmetric_tar_at_far": res["symmetric"]["tar_at_far"],
            "backbone_auc": res["backbone_cosine"]["auc"], "backbone_tar_at_far": res["backbone_cosine"]["tar_at_far"],
            "accuracy_at_calibrated_threshold": res["per_user_at_threshold"]["accuracy"],
            "heldout_balanced_accuracy": calib["balanced_accuracy"],
            # Wall time of the variant's own training (the first one also fills the shared cache).
            "train_seconds": payload.get("train_seconds"),
            "checkpoint": str(ckpt),
        })
    payload = {"pairs": str(getattr(pairs, "name", "")), "num_pairs": int(len(pairs.issame)),
               "backbone": str(backbone_ckpt), "base_config": cfg.model_dump(), "rows": rows}
    atomic_write_bytes(out_dir / "ablation.json",
                       lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, default=float)))
    return rows


def _diagnosis(hypernet, pairs, identities, negatives) -> dict:
    """Trunk cosine accuracy / AUC of this variant, and the fitted-head upper bound if possible."""
    from toolchain.evaluate.diagnose import diagnose

    known = identities is not None and len(identities[0]) == len(pairs)
    d = diagnose(hypernet, pairs, identities if known else None, negatives)
    row = {"trunk_cosine_accuracy": d["trunk_cosine"]["accuracy"], "trunk_cosine_auc": d["trunk_cosine"]["auc"]}
    if known:
        row.update(upper_bound_accuracy=d["head_upper_bound"]["accuracy"], upper_bound_auc=d["head_upper_bound"]["auc"],
                   upper_bound_tar_at_far=d["head_upper_bound"]["tar_at_far"])
    return row


def synthetic_benchmark(out_dir: str | Path, backbone_cfg: BackboneConfig | None = None,
                        hypernet_cfg: HypernetConfig | None = None, variants=DEFAULT_VARIANTS,
                        benchmark_overrides: dict | None = None, resume: bool = True,
                        progress: bool = True, workers: int = 2) -> list[dict]:
    """Default synthetic benchmark end to end: data -> backbone -> ablation on held-out pairs."""
    from toolchain.data.datasets import SyntheticIdentityDataset
    from toolchain.data.synthetic import default_benchmark
    from toolchain.train.backbone import train_backbone

    bench = default_benchmark(**(benchmark_overrides or {}))
    dataset = SyntheticIdentityDataset(bench, workers=workers)
    pairs = bench.verification_pairs(workers=workers)
    out_dir = Path(out_dir)
    bb_cfg = (backbone_cfg or BackboneConfig()).model_copy(update={"progress": progress})
    backbone = train_backbone(bb_cfg, dataset, out_dir / "backbone", resume=resume)
    rows = bench.pair_list()
    return run_ablation(hypernet_cfg or HypernetConfig(), backbone, dataset, pairs, out_dir, variants=variants,
                        resume=resume, progress=progress, identities=(rows[:, 0], rows[:, 2]))
