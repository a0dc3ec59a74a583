"""Forward selection of the units an int8 file keeps in float: the `.pte`'s block fallback
(measured in torch's reference int8 graph, toolchain.quantize.sensitivity) and the `.tflite`'s
(measured in LiteRT, toolchain.export.tflite_fallback) share it.

Each step keeps in float the unit that raises the embedding cosine to float most, given the
units already float (mean first, then minimum), until the targets hold. Units interact where one
alone does not: a float unit's output is still rounded where the next int8 op reads it.

The mean target is met on a lower confidence bound, not on the measured mean: the selection sees a
few dozen images, and parity judges the file on thousands of others. On MobileFaceNet's recipe,
export seeds 1 and 2, the `.tflite`'s choice measured 0.99909 and 0.99902 on its 32 images (then)
and 0.99895 and 0.99898 on the images of the 1,200 pairs, so the recipe failed its 0.999 bound
(README: the other recipes).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# One-sided 95% normal quantile: the mean target must hold with this confidence for images like
# the measured ones, not just for them.
CONFIDENCE_Z = 1.645


def cosine_summary(cosines: np.ndarray) -> dict:
    """Per-image embedding cosines to float -> their mean, minimum, and the mean's lower
    confidence bound (mean less CONFIDENCE_Z standard errors) that the mean target is held to."""
    c = np.asarray(cosines, dtype=np.float64)
    se = float(c.std(ddof=1)) / math.sqrt(len(c)) if len(c) > 1 else 0.0
    return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()),
            "cosine_mean_low": float(c.mean()) - CONFIDENCE_Z * se}


def targets_met(c: dict, min_cosine_mean: float | None, min_cosine_min: float | None) -> bool:
    """The mean target on the mean's lower bound (module docstring), the minimum on the minimum;
    None: not a target."""
    return (min_cosine_mean is None or c.get("cosine_mean_low", c["cosine_mean"]) >= min_cosine_mean) and \
           (min_cosine_min is None or c["cosine_min"] >= min_cosine_min)


def forward_selection(units: list[str], measure: Callable[[list[str]], dict | None], met: Callable[[dict], bool],
                      max_steps: int, trail: list[dict], label: str, progress: bool = False) -> dict:
    """measure(float units) -> {"cosine_mean", "cosine_min", ...} (extra keys reach the trail), or
    None when that choice is not allowed. `trail` holds the all-int8 row and gets one row a step.
    Returns {"float_units", "met", "tried", "trail"}; `float_units` is empty when the targets were
    not met: float units cost latency, and a file that misses its bounds anyway is better all int8."""
    from toolchain.console import progress_bar

    chosen: list[str] = []
    steps = min(max_steps, len(units))
    with progress_bar(label, steps, enabled=progress) as advance:
        for _ in range(steps):
            best = None
            for name in (u for u in units if u not in chosen):
                c = measure(chosen + [name])
                if c is not None and (best is None or (c["cosine_mean"], c["cosine_min"]) >
                                      (best[1]["cosine_mean"], best[1]["cosine_min"])):
                    best = (name, c)
            if best is None:
                break
            chosen.append(best[0])
            trail.append({"layers": len(chosen), "added": best[0], **best[1]})
            advance(1, cosine=best[1]["cosine_mean"])
            if met(best[1]):
                return {"float_units": list(chosen), "met": True, "tried": list(chosen), "trail": trail}
    return {"float_units": [], "met": False, "tried": chosen, "trail": trail}
