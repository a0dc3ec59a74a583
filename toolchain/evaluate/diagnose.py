"""Where the per-user route loses accuracy: two more scorers on the same pairs.

- trunk_cosine: cosine of f's shared trunk features (pooled, image + mirror) of the two images.
  What the trunk alone knows about identity, with no generated weights at all.
- head_upper_bound: for a pair (a, b), a linear head on the same trunk features trained directly
  for a's person on many of that person's images (every pair image of that identity except b,
  plus mirrors) against `negatives` (trunk features of training images: people not in the
  pairs), by logistic regression. What a head on this trunk can do when it is fitted rather
  than generated from one photo.

Read with the per-user route and backbone cosine (`per_user.evaluate_pairs`): trunk_cosine far
below backbone cosine means trunk capacity; per_user below head_upper_bound means generation from
one image; a per-user AUC close to the upper bound's with a lower 10-fold accuracy means scores
that are not calibrated across users (one global threshold).

Needs the identity of each pair image (`identities_a`, `identities_b`), which the pipeline keeps
beside the pairs it builds or generates.
"""

from __future__ import annotations

import numpy as np
import torch

from toolchain.errors import ToolchainError


@torch.no_grad()
def trunk_features(hypernet, images: np.ndarray, batch_size: int = 256, flip: bool = True) -> np.ndarray:
    """Shared trunk features (N, F) of uint8 NHWC images; with `flip`, image + mirror summed."""
    from toolchain.models.inputs import nhwc_uint8_to_input

    out = []
    for s in range(0, len(images), batch_size):
        x = nhwc_uint8_to_input(images[s:s + batch_size])
        f = hypernet.pooled(hypernet.features(x))
        if flip:
            f = f + hypernet.pooled(hypernet.features(torch.flip(x, dims=[3])))
        out.append(f)
    return torch.cat(out).double().numpy() if out else np.zeros((0, hypernet.feature_dim))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def head_upper_bound_scores(feats: np.ndarray, labels: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                            negatives: np.ndarray, c: float = 1.0) -> np.ndarray:
    """Score of each pair (ia[k], ib[k]) under a head fitted for identity labels[ia[k]] on all its
    images but ib[k] (see the module docstring). feats/negatives: (U, F) / (M, F) features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(np.concatenate([feats, negatives]))
    fz, nz = scaler.transform(feats), scaler.transform(negatives)
    scores = np.empty(len(ia))
    fitted: dict[tuple[int, int], object] = {}
    for k, (a, b) in enumerate(zip(ia, ib)):
        ident = int(labels[a])
        own = np.flatnonzero((labels == ident) & (np.arange(len(labels)) != b))
        key = (ident, int(b) if labels[b] == ident else -1)  # b only changes the fit when it is own
        if key not in fitted:
            x = np.concatenate([fz[own], nz])
            y = np.concatenate([np.ones(len(own)), np.zeros(len(nz))])
            fitted[key] = LogisticRegression(C=c, class_weight="balanced", max_iter=500).fit(x, y)
        scores[k] = fitted[key].decision_function(fz[b:b + 1])[0]
    return scores


def negative_sample(dataset, count: int = 1000, seed: int = 0) -> np.ndarray:
    """`count` training images (people outside the pairs), uint8 NHWC: the upper bound's negatives."""
    pick = np.sort(np.random.default_rng(seed).choice(len(dataset), min(len(dataset), count), replace=False))
    return np.stack([dataset.get_uint8(int(i)) for i in pick])


def diagnose(hypernet, pairs, identities=None, negative_images: np.ndarray | None = None) -> dict:
    """{"trunk_cosine": metrics, "head_upper_bound": metrics, "upper_bound_images": {...}} on
    `pairs` (VerificationPairs). identities: (person of each side a, of each side b); without
    them only "trunk_cosine" is computed."""
    from toolchain.evaluate.metrics import verification_metrics
    from toolchain.evaluate.per_user import dedup_images

    unique, ia, ib = dedup_images(pairs.images_a, pairs.images_b)
    feats = trunk_features(hypernet, unique)
    unit = _unit(feats)
    issame = np.asarray(pairs.issame, bool)
    cosine = (unit[ia] * unit[ib]).sum(1)
    if identities is None:
        return {"trunk_cosine": verification_metrics(cosine, issame), "scores": {"trunk_cosine": cosine}}
    ida, idb = np.asarray(identities[0]), np.asarray(identities[1])
    if len(ida) != len(pairs) or len(idb) != len(pairs):
        raise ToolchainError(f"identities for {len(ida)}/{len(idb)} pair sides, {len(pairs)} pairs")
    labels = np.empty(len(unique), np.int64)
    labels[ia], labels[ib] = ida, idb
    upper = head_upper_bound_scores(feats, labels, ia, ib, trunk_features(hypernet, negative_images))
    own = np.array([int(((labels == labels[a]) & (np.arange(len(labels)) != b)).sum()) for a, b in zip(ia, ib)])
    return {"trunk_cosine": verification_metrics(cosine, issame),
            "head_upper_bound": verification_metrics(upper, issame),
            "upper_bound_images": {"mean": float(own.mean()), "min": int(own.min()), "max": int(own.max()),
                                   "negatives": int(len(negative_images))},
            "scores": {"trunk_cosine": cosine, "head_upper_bound": upper}}
