"""Forward selection of the units an int8 file keeps in float: the `.pte`'s block fallback
(measured in torch's reference int8 graph, toolchain.quantize.sensitivity) and the `.tflite`'s
(measured in LiteRT, toolchain.export.tflite_fallback) share it.

Each step keeps in float the unit that does most for the bound the choice so far misses
(`ranking_key`), given the units already float, until the targets hold: the embedding cosine to
float (mean first, then minimum), or, once the cosine targets hold and only the agreement target
does not, the score noise at the decision threshold (what flips decisions). Units interact where
one alone does not: a float unit's output is still rounded where the next int8 op reads it.

Once the targets hold, a backward pass (`drop_unneeded`) puts back in int8 each unit the others
meet the targets without: a step ranked on few images can take a unit that later ones make
unneeded, and each float unit costs latency and bytes.

Steps take the largest gain whatever it costs in bytes. Under a size budget that can spend the
room on one large unit; when such steps miss the targets with a candidate refused for size, a
second pass ranks by gain per byte (`forward_selection`'s `sized`).

Two sets of images: the candidates of a step are ranked on RANKING_IMAGES of the measuring
images (one pass per candidate), or on all of them when the step ranks by the score noise
(`ranks_on_all`), and the stopping rule judges the step's choice on all of them (one pass per
step). The stopping rule (`cosine_summary`, `targets_met`) is built to predict the
parity bounds, which judge the file on a thousand other images:
- the mean target holds on the mean's one-sided 95% lower bound, not on the measured mean. On
  MobileFaceNet's recipe, export seeds 1 and 2, the `.tflite`'s choice measured 0.99909 and
  0.99902 on 32 images and 0.99895 and 0.99898 on the pairs', and the recipe failed
  (docs/int8-backbones.md).
- the lowest SET_ASIDE of the images are set aside from both statistics. int8 gets a few rare
  images badly wrong whatever stays float: SeesawFaceNet's all-int8 graph scored 0.48 and 0.58 on
  2 of 600 identity images (of two generator families) and at least 0.9939 on all 902 of the pairs'.
  One such image in the measuring set decided every step alone and held the bound out of reach.
  The report lists what was set aside; parity still judges every pair.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

CONFIDENCE_Z = 1.645  # one-sided 95% normal quantile
SET_ASIDE = 0.02  # of the measured images, the lowest cosines left out of the statistics
RANKING_IMAGES = 32  # of the measuring images, the ones every candidate is measured on


def ranking_indices(n: int) -> np.ndarray:
    """Which of n measuring images the candidates are ranked on: RANKING_IMAGES of them, evenly
    spaced (the measuring images come in identity order, so a prefix would be a few identities)."""
    return np.arange(0, n, max(1, n // RANKING_IMAGES))[:RANKING_IMAGES]


def cosine_summary(cosines: np.ndarray) -> dict:
    """Per-image embedding cosines to float -> the statistics the targets are judged on, over the
    images left after setting aside the lowest SET_ASIDE (rounded; module docstring): the mean,
    the minimum and the mean's lower confidence bound (mean less CONFIDENCE_Z standard errors),
    and `set_aside`, the cosines left out."""
    c = np.sort(np.asarray(cosines, dtype=np.float64))
    k = min(int(len(c) * SET_ASIDE + 0.5), len(c) - 1)
    kept = c[k:]
    se = float(kept.std(ddof=1)) / math.sqrt(len(kept)) if len(kept) > 1 else 0.0
    return {"cosine_mean": float(kept.mean()), "cosine_min": float(kept.min()),
            "cosine_mean_low": float(kept.mean()) - CONFIDENCE_Z * se, "set_aside": [float(x) for x in c[:k]]}


def embedding_summary(embeddings: np.ndarray, reference: np.ndarray, agreement: dict | None = None) -> dict:
    """cosine_summary of L2-normalised `embeddings` against `reference`, and with an agreement
    target ({"score_threshold", "max_score_noise"}, toolchain.evaluate.flips.agreement_target)
    the score noise expected at its threshold (toolchain.evaluate.flips.score_noise_at)."""
    from toolchain.evaluate.flips import score_noise_at

    out = cosine_summary(np.sum(embeddings * reference, axis=1))
    if agreement:
        out["score_noise"] = score_noise_at(embeddings, reference, agreement["score_threshold"])
    return out


def targets_met(c: dict, min_cosine_mean: float | None, min_cosine_min: float | None,
                max_score_noise: float | None = None) -> bool:
    """The mean target on the mean's lower bound (module docstring), the minimum on the minimum,
    the agreement target on the score noise (toolchain.evaluate.flips.agreement_target); None:
    not a target."""
    return (min_cosine_mean is None or c.get("cosine_mean_low", c["cosine_mean"]) >= min_cosine_mean) and \
           (min_cosine_min is None or c["cosine_min"] >= min_cosine_min) and \
           (max_score_noise is None or c["score_noise"] <= max_score_noise)


def cosine_key(c: dict) -> tuple:
    """Rank by the embedding cosine: the mean first, then the minimum (larger ranks first)."""
    return c["cosine_mean"], c["cosine_min"]


def noise_key(c: dict) -> tuple:
    """Rank by the score noise at the decision threshold, the lowest first (larger keys rank first)."""
    return -c["score_noise"], c["cosine_mean"]


def ranking_key(judged: dict, min_cosine_mean: float | None, min_cosine_min: float | None) -> Callable[[dict], tuple]:
    """What the next step ranks its candidates by, given the choice so far as judged on all the
    measuring images: the score noise (`noise_key`) when its cosine targets hold and it has an
    agreement target (which then is what it misses), else the cosine (`cosine_key`).

    The cosine bounds do not imply agreement: VarGFaceNet's all-int8 files met them with room
    and flipped too many decisions (toolchain.evaluate.flips.agreement_target). And the two
    order units differently: with one VarGFaceNet block at a time in float (export seed 2,
    docs/int8-backbones.md), `head.4` came third by the cosine and did nothing for the noise on
    512 other identity images."""
    if "score_noise" in judged and targets_met(judged, min_cosine_mean, min_cosine_min):
        return noise_key
    return cosine_key


def ranks_on_all(key: Callable[[dict], tuple]) -> bool:
    """Whether candidates ranked by `key` are measured on all the measuring images, not on the
    RANKING_IMAGES: the score noise is read from the pairs among them, 496 pairs for 32 images
    and 8,128 for 128. Against the noise on 512 other identity images, VarGFaceNet's blocks (one
    at a time in float, export seed 2) ranked by their noise on the 128 measuring images with a
    Spearman correlation of 0.92, on the 32 ranking images 0.73 (by the cosine: 0.84 and 0.58;
    benchmarks/bench_fallback_ranking.py)."""
    return key is noise_key


def forward_selection(units: list[str], rank: Callable[[list[str], Callable], dict | None],
                      judge: Callable[[list[str]], dict], met: Callable[[dict], bool], max_steps: int,
                      trail: list[dict], label: str, progress: bool = False,
                      key_for: Callable[[dict], Callable[[dict], tuple]] | None = None, sized: bool = False) -> dict:
    """rank(float units, key) -> {"cosine_mean", "cosine_min", ...} on the ranking images (all
    the measuring images where `ranks_on_all(key)`), with what `key` reads, or None when that
    choice is not allowed; judge(float units) -> the same on all measuring images (extra keys
    reach the trail), which `met` is asked about. `trail` holds the all-int8 row and gets one
    row a step. key_for(the last judged row) -> the key each step ranks by (`ranking_key`; None:
    always `cosine_key`). Returns {"float_units", "met", "tried", "trail"}: `tried`, the forward
    steps' units; `float_units`, those `drop_unneeded` keeps once the targets hold. When they
    were not met, `quietest_short` decides (the result has "closest" when it keeps any).

    sized: rank's results carry "bytes", the choice's file size. Each step takes the largest
    gain whatever it costs in bytes, the fewest units being what saves latency; when such steps
    miss the targets and rank refused a candidate on the way (a size budget), one large unit may
    have spent the room that smaller ones needed (SeesawFaceNet's `.tflite` at export seed 2 took
    `features.9`, 52 KB, and ran out of room). A second pass then starts again from all int8 and
    takes, each step, the largest gain per byte (`gain_per_byte`); its rows are in the trail
    with "pass": "per byte", and its choice is kept when it meets the targets. The result then
    has "per_byte": {"tried", "met"}; `tried` stays the first pass's units."""
    chosen, ok, refused = _steps(units, functools.partial(largest_gain, rank), judge, met, max_steps, trail, label,
                                 progress, key_for)
    if ok:
        return {"float_units": drop_unneeded(chosen, judge, met, trail), "met": True, "tried": chosen, "trail": trail}
    short = quietest_short(chosen, trail, key_for)
    if not (sized and refused):
        return short

    second = [trail[0]]
    chosen2, ok2, _ = _steps(units, functools.partial(gain_per_byte, rank), judge, met, max_steps, second,
                             label + " (per byte)", progress, key_for)
    kept = drop_unneeded(chosen2, judge, met, second) if ok2 else []
    trail.extend({**row, "pass": "per byte"} for row in second[1:])
    ran = {"per_byte": {"tried": chosen2, "met": ok2}}
    if not ok2:
        return {**short, **ran}
    return {"float_units": kept, "met": True, "tried": chosen, "trail": trail, **ran}


def largest_gain(rank: Callable[[list[str], Callable], dict | None], chosen: list[str], candidates: list[str],
                 key: Callable[[dict], tuple]) -> tuple[str | None, bool]:
    """The candidate whose choice ranks highest by `key`, whatever its bytes. -> (name or None,
    whether rank refused any)."""
    best, refused = None, False
    for name in candidates:
        c = rank(chosen + [name], key)
        if c is None:
            refused = True
        elif best is None or key(c) > key(best[1]):
            best = (name, c)
    return (best[0] if best else None), refused


def gain_per_byte(rank: Callable[[list[str], Callable], dict | None], chosen: list[str], candidates: list[str],
                  key: Callable[[dict], tuple]) -> tuple[str | None, bool]:
    """The candidate whose unit adds most to `key`'s first value per byte it adds to the file
    (rank's "bytes"), both against `chosen` ranked the same way; candidates that gain nothing are
    not taken. -> (name or None, whether rank refused any)."""
    base = rank(chosen, key)
    if base is None:
        return None, True
    best, refused = None, False
    for name in candidates:
        c = rank(chosen + [name], key)
        if c is None:
            refused = True
            continue
        gain = key(c)[0] - key(base)[0]
        if not gain > 0:
            continue
        value = gain / max(c["bytes"] - base["bytes"], 1)  # a unit can cost no bytes (scales dropped)
        if best is None or value > best[1]:
            best = (name, value)
    return (best[0] if best else None), refused


def _steps(units: list[str], pick, judge: Callable[[list[str]], dict], met: Callable[[dict], bool], max_steps: int,
           trail: list[dict], label: str, progress: bool,
           key_for: Callable[[dict], Callable[[dict], tuple]] | None) -> tuple[list[str], bool, bool]:
    """Forward steps: pick(chosen, candidates, key) -> (unit or None, refused any) adds one unit a
    step, judged and appended to `trail`, until the targets hold, no candidate is left or
    `max_steps`. -> (chosen, met, whether a candidate was refused on the way)."""
    from toolchain.console import progress_bar

    chosen: list[str] = []
    refused = False
    steps = min(max_steps, len(units))
    with progress_bar(label, steps, enabled=progress) as advance:
        for _ in range(steps):
            key = key_for(trail[-1]) if key_for is not None else cosine_key
            name, step_refused = pick(chosen, [u for u in units if u not in chosen], key)
            refused = refused or step_refused
            if name is None:
                break
            chosen.append(name)
            judged = judge(list(chosen))
            trail.append({"layers": len(chosen), "added": name, **judged})
            advance(1, cosine=judged["cosine_mean"])
            if met(judged):
                return chosen, True, refused
    return chosen, False, refused


def quietest_short(chosen: list[str], trail: list[dict],
                   key_for: Callable[[dict], Callable[[dict], tuple]] | None) -> dict:
    """The result of forward steps that never met the targets: `chosen`, each step's prefix
    judged in `trail` after its all-int8 row (a row's `layers` is its prefix's length). Where a
    step ranked by the noise (`key_for` gave `noise_key`: the cosine targets held and only the
    agreement target was missed), the prefix with the lowest score noise is kept when it is
    quieter than all int8. The agreement target asks for less noise than parity's bound needs
    (its risk, toolchain.evaluate.flips.agreement_target), so a file short of it still passes
    parity more often the quieter it is: with `export.int8.agreement_risk` 0.01, VarGFaceNet's
    `.tflite` steps stopped at the size budget and the file went all int8, noisier than after
    its first step (docs/int8-backbones.md). Otherwise nothing is kept: float units cost latency,
    and a file that misses its cosine bounds anyway is better all int8."""
    miss = {"float_units": [], "met": False, "tried": list(chosen), "trail": trail}
    if key_for is None:
        return miss
    # Unmet, the trail holds only the all-int8 row and the forward steps (no backward tries).
    steps = [r for r in trail if key_for(r) is noise_key and math.isfinite(r["score_noise"])]
    if not steps:
        return miss
    best = min(steps, key=lambda r: (r["score_noise"], r["layers"]))
    if best["layers"] == 0:
        return miss
    return {**miss, "float_units": list(chosen[:best["layers"]]), "closest": True}


def drop_unneeded(chosen: list[str], judge: Callable[[list[str]], dict], met: Callable[[dict], bool],
                  trail: list[dict]) -> list[str]:
    """The backward pass after a forward selection met its targets: each chosen unit is put back
    in int8 when the others still meet the targets without it, judged on all the measuring images.
    A greedy step ranked on the ranking images can take a unit that does little once later units
    are float: SeesawFaceNet's `.tflite` at export seed 0 (Intel Xeon) took `features.6`, and the
    judged cosine mean went down (0.999019 to 0.999011). Units are tried in the order of what their
    step added to the judged cosine mean, the least first; a set the forward steps already judged
    (the choice without its last unit) is not judged again. `trail` (the forward rows, the all-int8
    one first) gets a row per try, with `removed` and whether the rest `met` the targets."""
    gain = {row["added"]: row["cosine_mean"] - before["cosine_mean"]
            for before, row in zip(trail, trail[1:]) if row.get("added") in chosen}
    kept = list(chosen)
    for name in sorted(chosen, key=lambda n: gain.get(n, 0.0)):
        rest = [n for n in kept if n != name]
        if rest == chosen[:len(rest)]:
            continue  # an earlier forward step, judged and not met
        judged = judge(rest)
        ok = met(judged)
        trail.append({"layers": len(rest), "removed": name, "met": ok, **judged})
        if ok:
            kept = rest
    return kept
