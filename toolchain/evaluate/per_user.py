"""Per-user verifiers against the backbone's cosine similarity, on the same verification pairs.

For a pair (a, b):
- per_user:  f(b; theta_a), theta_a = h_gen(h_bb(a)) -- what the phone of user a computes on b;
- symmetric: (f(b; theta_a) + f(a; theta_b)) / 2;
- backbone_cosine: cos(h_bb(a), h_bb(b)), the baseline (insightface protocol: image + mirror).
All three go through the same metrics (`toolchain.evaluate.metrics.verification_metrics`: 10-fold
accuracy with the threshold chosen on the other nine folds, TAR@FAR, AUC, EER). The per-user score
is additionally judged at the single threshold calibrated at training (what enrollment ships).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolchain.errors import ToolchainError
from toolchain.models.hypernet import HypernetBundle, HyperNetwork, load_hypernet

ROUTES = ("per_user", "symmetric", "backbone_cosine")


def dedup_images(images_a: np.ndarray, images_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique images (U,H,W,3), index of each a-image, index of each b-image): pair sets reuse
    images (a synthetic or LFW image appears in several pairs), so each is embedded once."""
    import hashlib

    where: dict[bytes, int] = {}
    refs: list[tuple[np.ndarray, int]] = []
    index = []
    for arr in (images_a, images_b):
        idx = np.empty(len(arr), dtype=np.int64)
        for k in range(len(arr)):
            key = hashlib.blake2b(np.ascontiguousarray(arr[k]).tobytes(), digest_size=16).digest()
            if key not in where:
                where[key] = len(refs)
                refs.append((arr, k))
            idx[k] = where[key]
        index.append(idx)
    unique = np.stack([arr[k] for arr, k in refs]) if refs else np.zeros((0, 112, 112, 3), np.uint8)
    return unique, index[0], index[1]


@torch.no_grad()
def _unique_features(bundle: HypernetBundle, unique: np.ndarray, batch_size: int, with_embeddings: bool,
                     progress: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    from toolchain.console import progress_bar
    from toolchain.models.inputs import embed, nhwc_uint8_to_input

    emb, feats = [], []
    with progress_bar("embedding pair images", len(unique), enabled=progress) as advance:
        for s in range(0, len(unique), batch_size):
            x = nhwc_uint8_to_input(unique[s:s + batch_size])
            if with_embeddings:
                emb.append(embed(bundle.backbone, x, flip=bundle.flip))
            feats.append(bundle.hypernet.features(x))
            advance(len(x))
    return (torch.cat(emb) if with_embeddings else None), torch.cat(feats)


@torch.no_grad()
def backbone_embeddings(bundle: HypernetBundle, pairs, batch_size: int = 128) -> torch.Tensor:
    """h_bb's L2-normalised embeddings (image + mirror) of the pairs' unique images, in
    `dedup_images` order; pass to `evaluate_pairs(embeddings=...)` to score several hypernets
    that share one backbone (the ablation) without embedding the pairs again."""
    from toolchain.models.inputs import embed, nhwc_uint8_to_input

    unique, _, _ = dedup_images(pairs.images_a, pairs.images_b)
    return torch.cat([embed(bundle.backbone, nhwc_uint8_to_input(unique[s:s + batch_size]), flip=bundle.flip)
                      for s in range(0, len(unique), batch_size)])


@torch.no_grad()
def pair_scores(bundle: HypernetBundle, images_a: np.ndarray, images_b: np.ndarray, batch_size: int = 128,
                progress: bool = True, embeddings: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Scores of the three routes for uint8 NHWC image pairs -> {route: (N,) float64}.

    Every distinct image is embedded by h_bb and run through the trunk once. `embeddings`:
    `backbone_embeddings` of these pairs if already known."""
    if len(images_a) != len(images_b):
        raise ToolchainError(f"pair images differ in number: {len(images_a)} vs {len(images_b)}")
    unique, ia, ib = dedup_images(images_a, images_b)
    if embeddings is not None and len(embeddings) != len(unique):
        raise ToolchainError(f"{len(embeddings)} precomputed embeddings for {len(unique)} distinct pair images")
    emb, feats = _unique_features(bundle, unique, batch_size, embeddings is None, progress)
    emb = embeddings if embeddings is not None else emb
    hn = bundle.hypernet
    out = {k: [] for k in ROUTES}
    for s in range(0, len(ia), batch_size):
        a, b = torch.as_tensor(ia[s:s + batch_size]), torch.as_tensor(ib[s:s + batch_size])
        f_ab = HyperNetwork.score_pairs(hn(emb[a]), feats[b])  # f(b; theta_a)
        f_ba = HyperNetwork.score_pairs(hn(emb[b]), feats[a])  # f(a; theta_b)
        out["per_user"].append(f_ab)
        out["symmetric"].append(0.5 * (f_ab + f_ba))
        out["backbone_cosine"].append((emb[a] * emb[b]).sum(1))
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def _load_pairs(pairs):
    if isinstance(pairs, (str, Path)):
        from toolchain.data import load_pairs

        return load_pairs(pairs)
    return pairs


def evaluate_pairs(hypernet_ckpt: str | Path | HypernetBundle, pairs, progress: bool = True,
                   batch_size: int = 128, embeddings: torch.Tensor | None = None) -> dict:
    """Metrics of the per-user, symmetric and backbone-cosine routes on one pair set.

    `pairs`: a `VerificationPairs` (images_a, images_b uint8 NHWC, issame) or a path that
    `toolchain.data.load_pairs` reads. Returns {route: metrics dict, "per_user_at_threshold":
    {...}, "scores": {route: ndarray}, "issame": ndarray, "num_pairs": int, "pairs": name}.
    """
    from toolchain.evaluate.metrics import verification_metrics

    bundle = hypernet_ckpt if isinstance(hypernet_ckpt, HypernetBundle) else load_hypernet(hypernet_ckpt)
    pairs = _load_pairs(pairs)
    issame = np.asarray(pairs.issame, dtype=bool)
    scores = pair_scores(bundle, pairs.images_a, pairs.images_b, batch_size=batch_size, progress=progress,
                         embeddings=embeddings)
    result: dict = {route: verification_metrics(scores[route], issame, higher_is_same=True) for route in ROUTES}
    accept = scores["per_user"] >= bundle.threshold
    result["per_user_at_threshold"] = {
        "threshold": bundle.threshold,
        "accuracy": float((accept == issame).mean()),
        "tar": float(accept[issame].mean()) if issame.any() else float("nan"),
        "far": float(accept[~issame].mean()) if (~issame).any() else float("nan"),
    }
    result.update(scores=scores, issame=issame, num_pairs=int(len(issame)),
                  pairs=str(getattr(pairs, "name", "") or ""))
    return result


def to_jsonable(result: dict, with_scores: bool = False) -> dict:
    """`evaluate_pairs` output without numpy types (scores only when asked)."""

    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        return v

    out = {k: v for k, v in result.items() if with_scores or k not in ("scores", "issame")}
    return conv(out)
