"""Held-out identities and verification pairs for an image folder (`data.source: folder`).

- `split_identities`: a seeded split of identities into training and held-out ones; nobody in the
  held-out part is seen by any training stage.
- `build_pairs`: matched and mismatched pairs among held-out images. Matched pairs are drawn
  round-robin over identities (so the few people with many photos do not fill the set); a share
  of the mismatched pairs are hard: the probe comes from one of the `look_alikes` identities
  whose embedding centre is nearest the enrolled image's identity (embeddings given by the
  caller, e.g. the trained backbone), the rest are random.
- The pair order is the insightface one: fold k of `n_folds` holds its matched pairs then its
  mismatched ones, every fold balanced, so the 10-fold protocol can keep contiguous folds.

Pure numpy: the embeddings are computed by whoever calls (the pipeline, with the backbone).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError

# Beside a pair file the toolchain made: the person of each pair side, {"a": [...], "b": [...]}.
PAIR_IDENTITIES = "pair_identities.json"


def write_pair_identities(path, ids_a, ids_b) -> None:
    from toolchain.atomic import write_json_atomic

    write_json_atomic(Path(path), {"a": [int(i) for i in ids_a], "b": [int(i) for i in ids_b]})


def read_pair_identities(pairs_path) -> tuple[np.ndarray, np.ndarray] | None:
    """(person of each side a, of each side b) from the file beside `pairs_path` (a pair file or
    its folder), or None when there is none."""
    p = Path(pairs_path)
    side = (p if p.is_dir() else p.parent) / PAIR_IDENTITIES
    if not side.is_file():
        return None
    rec = json.loads(side.read_text())
    return np.asarray(rec["a"]), np.asarray(rec["b"])


def held_out_count(n_identities: int, val: float | int) -> int:
    """`val` as a number of identities: a share (0 < val < 1) or a count (val >= 1)."""
    count = int(round(n_identities * val)) if 0 < val < 1 else int(val)
    if count < 2 or count > n_identities - 2:
        raise ToolchainError(f"data.val_identities={val}: gives {count} held-out identities of {n_identities} "
                             "(need at least 2 held out and 2 for training)")
    return count


def split_identities(labels: np.ndarray, val: float | int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training identities, held-out identities), sorted; held-out ones need >= 2 images so
    that each can give a matched pair."""
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    n_val = held_out_count(len(ids), val)
    eligible = ids[counts >= 2]
    if len(eligible) < n_val:
        raise ToolchainError(f"{n_val} held-out identities asked, only {len(eligible)} have 2 or more images")
    held = np.sort(np.random.default_rng(seed).choice(eligible, n_val, replace=False))
    return np.setdiff1d(ids, held), held


def build_pairs(labels: np.ndarray, n_pairs: int, *, hard_share: float = 0.5, seed: int = 0,
                embeddings: np.ndarray | None = None, look_alikes: int = 3, n_folds: int = 10) -> np.ndarray:
    """(n_pairs, 3) int64 rows (item a, item b, issame) over the items of `labels`.

    Half the pairs are matched. `hard_share` of the mismatched ones are look-alikes in the space
    of `embeddings` (N, D), which must be given when hard_share > 0. Rows come in `n_folds`
    balanced folds (matched then mismatched in each)."""
    labels = np.asarray(labels)
    if n_pairs % (2 * n_folds):
        raise ToolchainError(f"data.pairs={n_pairs}: must be a multiple of {2 * n_folds} ({n_folds} balanced folds)")
    if not 0 <= hard_share <= 1:
        raise ToolchainError(f"hard-negative share {hard_share} is not in [0, 1]")
    if hard_share > 0 and (embeddings is None or len(embeddings) != len(labels)):
        raise ToolchainError("hard negatives need one embedding per image")
    rng = np.random.default_rng(seed)
    half = n_pairs // 2
    matched = _matched(labels, half, rng)
    n_hard = int(round(half * hard_share))
    used = {tuple(sorted(r)) for r in matched.tolist()}
    hard = _hard_mismatched(labels, embeddings, n_hard, look_alikes, rng, used) if n_hard else np.zeros((0, 2), np.int64)
    easy = _random_mismatched(labels, half - n_hard, rng, used)
    mismatched = np.concatenate([hard, easy])
    mismatched = mismatched[rng.permutation(len(mismatched))]
    rows = []
    for m, u in zip(np.array_split(matched, n_folds), np.array_split(mismatched, n_folds)):
        rows += [np.column_stack([m, np.ones(len(m), np.int64)]), np.column_stack([u, np.zeros(len(u), np.int64)])]
    return np.concatenate(rows).astype(np.int64)


def _matched(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct same-identity pairs, one identity at a time in turn."""
    pools = []
    for ident in rng.permutation(np.unique(labels)):
        items = np.flatnonzero(labels == ident)
        if len(items) < 2:
            continue
        a, b = np.triu_indices(len(items), 1)
        order = rng.permutation(len(a))
        pools.append(np.column_stack([items[a[order]], items[b[order]]]))
    available = sum(len(p) for p in pools)
    if available < n:
        raise ToolchainError(f"{n} matched pairs asked, the held-out identities allow only {available}")
    out, depth = [], 0
    while len(out) < n:
        for pool in pools:
            if depth < len(pool) and len(out) < n:
                out.append(pool[depth])
        depth += 1
    out = np.asarray(out, np.int64)
    flip = rng.random(len(out)) < 0.5  # which side is enrolled should not depend on file order
    out[flip] = out[flip][:, ::-1]
    return out


def _random_mismatched(labels: np.ndarray, n: int, rng: np.random.Generator, used: set) -> np.ndarray:
    out = []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        a, b = rng.integers(0, len(labels), 2)
        key = (min(a, b), max(a, b))
        if labels[a] != labels[b] and key not in used:
            used.add(key)
            out.append((a, b))
    if len(out) < n:
        raise ToolchainError(f"could not draw {n} distinct mismatched pairs from {len(labels)} images")
    return np.asarray(out, np.int64).reshape(-1, 2)


def _hard_mismatched(labels: np.ndarray, embeddings: np.ndarray, n: int, look_alikes: int,
                     rng: np.random.Generator, used: set) -> np.ndarray:
    """Mismatched pairs whose second image belongs to one of the first image's identity's
    `look_alikes` nearest identities (cosine of L2-normalised embedding centres)."""
    emb = np.asarray(embeddings, np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    ids = np.unique(labels)
    if len(ids) < 2:
        raise ToolchainError("hard negatives need at least 2 identities")
    centres = np.stack([emb[labels == i].mean(0) for i in ids])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    sim = centres @ centres.T
    np.fill_diagonal(sim, -np.inf)
    k = min(look_alikes, len(ids) - 1)
    nearest = np.argsort(-sim, axis=1)[:, :k]
    members = {row: np.flatnonzero(labels == ident) for row, ident in enumerate(ids)}
    out = []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        row = int(rng.integers(len(ids)))
        a = int(rng.choice(members[row]))
        b = int(rng.choice(members[int(rng.choice(nearest[row]))]))
        key = (min(a, b), max(a, b))
        if key not in used:
            used.add(key)
            out.append((a, b))
    if len(out) < n:
        raise ToolchainError(f"could not draw {n} distinct look-alike pairs among {len(ids)} identities")
    return np.asarray(out, np.int64).reshape(-1, 2)
