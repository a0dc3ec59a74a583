"""Forward selection of the units an int8 file keeps in float: the `.pte`'s block fallback
(measured in torch's reference int8 graph, toolchain.quantize.sensitivity) and the `.tflite`'s
(measured in LiteRT, toolchain.export.tflite_fallback) share it.

Each step keeps in float the unit that raises the embedding cosine to float most, given the
units already float (mean first, then minimum), until the targets hold. Units interact where one
alone does not: a float unit's output is still rounded where the next int8 op reads it.
"""

from __future__ import annotations

from typing import Callable


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
