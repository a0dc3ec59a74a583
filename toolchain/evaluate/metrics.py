"""Face-verification metrics: the insightface 10-fold protocol, TAR at FAR, AUC, EER.

Conventions (documented because papers differ):
- `scores` are similarities by default (`higher_is_same=True`); pass distances (for example the
  squared L2 distance of the insightface protocol) with `higher_is_same=False`. Internally a
  distance is negated, and thresholds are reported back in the caller's units.
- accuracy / accuracy_std: the pairs are split into `n_folds` contiguous folds *without
  shuffling* (sklearn KFold(shuffle=False), as insightface does, so a .bin's fold layout is
  kept) when every contiguous fold is balanced (its matched share within 0.1 of the whole
  set's). Otherwise (e.g. LFW's pairs.txt cut short, or a list of all matched pairs then all
  mismatched ones) contiguous folds would each hold one class, so the folds are stratified
  (sklearn StratifiedKFold(shuffle=False): each class split in order) and `folds` says so; on
  each fold the threshold that maximises accuracy on the other folds is applied; the
  mean and the population std (numpy's default, as insightface) of the fold accuracies.
- threshold: the threshold that maximises accuracy on *all* pairs (what a deployment would
  use); the per-fold thresholds are in `fold_thresholds`. Candidate thresholds are the midpoints
  between consecutive distinct scores, so the decision never depends on ties at a threshold.
  "same" means score > threshold (similarity) or distance < threshold.
- tar_at_far: on all pairs, the highest true-accept rate whose false-accept rate is <= the
  target (a step ROC, no interpolation). With M negative pairs a FAR below 1/M can only be met
  with zero false accepts; `far_resolution` = 1/M says where that starts.
- cross_pair_tar: the same TAR over every pair of a set of images whose people are known (the
  IJB way): n images give n(n-1)/2 pairs, so a thousand images put FAR=1e-3 hundreds of false
  accepts deep instead of at the single top impostor of a 1,200-pair list.
- auc: area under the ROC (scikit-learn); eer: where FAR equals FRR, linearly interpolated
  between the two ROC points around the crossing.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import auc as _sk_auc
from sklearn.metrics import roc_curve

from toolchain.errors import ToolchainError

FAR_TARGETS = {"1e-3": 1e-3, "1e-4": 1e-4}


def _validate(scores, issame, n_folds: int | None = None):
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(issame).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ToolchainError("issame must be booleans (or 0/1)")
        y = y.astype(bool)
    if len(s) != len(y):
        raise ToolchainError(f"scores ({len(s)}) and issame ({len(y)}) differ in length")
    if not np.isfinite(s).all():
        raise ToolchainError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if y.all() or not y.any():
        raise ToolchainError("verification metrics need both matched and mismatched pairs")
    if n_folds is not None and len(s) < n_folds:
        raise ToolchainError(f"{len(s)} pairs cannot make {n_folds} folds")
    return s, y


def _best_threshold(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Threshold t (predict same when s > t) that maximises accuracy on (s, y); and that accuracy.

    Ties between thresholds go to the lowest candidate (the most permissive), deterministically.
    """
    u = np.unique(s)  # ascending
    cand = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    tp = len(pos) - np.searchsorted(pos, cand, side="right")  # positives above t
    tn = np.searchsorted(neg, cand, side="right")  # negatives at or below t
    acc = (tp + tn) / len(s)
    k = int(np.argmax(acc))
    return float(cand[k]), float(acc[k])


def _accuracy(s: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(np.mean((s > t) == y))


def roc_points(scores, issame, higher_is_same: bool = True):
    """(fpr, tpr, thresholds) numpy arrays of the ROC, thresholds in the caller's units."""
    s, y = _validate(scores, issame)
    sign = 1.0 if higher_is_same else -1.0
    fpr, tpr, thr = roc_curve(y, sign * s, drop_intermediate=False)
    return fpr, tpr, sign * thr


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    fnr = 1.0 - tpr
    diff = fpr - fnr  # non-decreasing along the ROC
    i = int(np.searchsorted(diff, 0.0, side="left"))
    if i == 0:
        return float(fpr[0])
    if i >= len(diff):
        return float(fnr[-1])
    d0, d1 = diff[i - 1], diff[i]
    w = d0 / (d0 - d1) if d1 != d0 else 0.0
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def fold_indices(issame: np.ndarray, n_folds: int = 10, tolerance: float = 0.1) -> tuple[list[np.ndarray], str]:
    """(test indices of each fold, "contiguous" | "stratified"); see the module docstring."""
    y = np.asarray(issame, bool)
    folds = np.array_split(np.arange(len(y)), n_folds)
    share = y.mean()
    if all(abs(y[f].mean() - share) <= tolerance for f in folds):
        return folds, "contiguous"
    from sklearn.model_selection import StratifiedKFold

    if min(int(y.sum()), int((~y).sum())) < n_folds:  # too few to stratify: keep the file's folds
        return folds, "contiguous (unbalanced; too few pairs to stratify)"
    split = StratifiedKFold(n_splits=n_folds, shuffle=False).split(np.zeros(len(y)), y)
    return [np.sort(test) for _, test in split], "stratified"


def verification_metrics(scores, issame, higher_is_same: bool = True, n_folds: int = 10) -> dict:
    """Metrics of a verification run; see the module docstring for every convention.

    Returns a JSON-friendly dict: accuracy, accuracy_std, fold_accuracies, threshold,
    fold_thresholds, higher_is_same, tar_at_far {"1e-3", "1e-4"}, far_resolution, auc, eer,
    num_pairs, num_matched, num_mismatched.
    """
    s, y = _validate(scores, issame, n_folds)
    sign = 1.0 if higher_is_same else -1.0
    z = sign * s  # similarities from here on
    folds, fold_kind = fold_indices(y, n_folds)
    accs, thresholds = [], []
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        t, _ = _best_threshold(z[train], y[train])
        accs.append(_accuracy(z[test], y[test], t))
        thresholds.append(sign * t)
    t_all, _ = _best_threshold(z, y)

    fpr, tpr, _ = roc_curve(y, z, drop_intermediate=False)
    tar = {}
    for key, far in FAR_TARGETS.items():
        ok = fpr <= far
        tar[key] = float(tpr[ok].max()) if ok.any() else 0.0
    n_neg = int((~y).sum())
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "fold_accuracies": [float(a) for a in accs],
        "threshold": float(sign * t_all),
        "fold_thresholds": [float(t) for t in thresholds],
        "higher_is_same": bool(higher_is_same),
        "tar_at_far": tar,
        "far_resolution": 1.0 / n_neg,
        "auc": float(_sk_auc(fpr, tpr)),
        "eer": _eer(fpr, tpr),
        "folds": fold_kind,
        "num_pairs": int(len(z)),
        "num_matched": int(y.sum()),
        "num_mismatched": n_neg,
    }


# Above this many images the n x n scores of cross_pair_tar (200 MB at 5,000) grow too large;
# callers fall back to the listed pairs.
CROSS_PAIR_MAX_IMAGES = 5000


def cross_pair_tar(embeddings: np.ndarray, identities: np.ndarray) -> dict | None:
    """TAR at each FAR_TARGETS over every pair (i < j) of the images: L2-normalised embeddings
    (n, d), scored by cosine; the pair is genuine when `identities` match. Same step-ROC rule as
    verification_metrics: the highest TAR whose false accepts are at most FAR x impostors.
    Returns {"tar_at_far", "far_resolution", "genuine", "impostor"}, or None when the set has no
    genuine or no impostor pair, or more than CROSS_PAIR_MAX_IMAGES images."""
    e = np.asarray(embeddings, dtype=np.float64)
    ids = np.asarray(identities).reshape(-1)
    n = len(e)
    if n != len(ids):
        raise ToolchainError(f"cross_pair_tar: {n} embeddings but {len(ids)} identities")
    if n < 2 or n > CROSS_PAIR_MAX_IMAGES:
        return None
    i, j = np.triu_indices(n, 1)
    scores = (e @ e.T)[i, j]
    same = ids[i] == ids[j]
    genuine, impostor = scores[same], scores[~same]
    if not len(genuine) or not len(impostor):
        return None
    tar = {}
    for key, far in FAR_TARGETS.items():
        allowed = int(np.floor(far * len(impostor) + 1e-9))  # false accepts the FAR leaves
        if allowed >= len(impostor):
            tar[key] = 1.0
            continue
        # Accept above the (allowed + 1)-th highest impostor score.
        bar = np.partition(impostor, len(impostor) - 1 - allowed)[len(impostor) - 1 - allowed]
        tar[key] = float(np.mean(genuine > bar))
    return {"tar_at_far": tar, "far_resolution": 1.0 / len(impostor), "genuine": int(len(genuine)),
            "impostor": int(len(impostor))}
