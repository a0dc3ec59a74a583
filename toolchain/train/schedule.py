"""The objective schedule of the hypernetwork training.

With `schedule=True`, over the run's `steps` (t = step / steps):
1. warm-up, t < w (`schedule_warmup`): random batches only (easy negatives) and the norm penalty
   at `schedule_norm_start` x lambda, so h_gen first learns to write useful heads at all;
2. ramp, w <= t < w + r (`schedule_ramp`): the share of KCS batches grows linearly from 0 to
   `kcs_fraction` and the norm weight from the start factor to the full lambda;
3. final, t >= w + r: `kcs_fraction` of the batches are KCS batches (the rest stay random so easy
   negatives are not forgotten), full lambda.
With `schedule=False` the final mix and weight apply from the first step (the ablation).
With `kcs=False` every batch is random; with `norm_penalty=0` there is no penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.train.config import HypernetConfig


@dataclass(frozen=True)
class Objective:
    kcs_prob: float  # probability that this step's batch is a KCS batch
    norm_weight: float  # lambda applied to ||theta||^2 at this step


def objective_at(cfg: HypernetConfig, step: int) -> Objective:
    kcs_final = cfg.kcs_fraction if cfg.kcs else 0.0
    if not cfg.schedule:
        return Objective(kcs_final, cfg.norm_penalty)
    t = step / max(1, cfg.steps)
    if t < cfg.schedule_warmup:
        ramp = 0.0
    elif cfg.schedule_ramp > 0 and t < cfg.schedule_warmup + cfg.schedule_ramp:
        ramp = (t - cfg.schedule_warmup) / cfg.schedule_ramp
    else:
        ramp = 1.0
    start = cfg.schedule_norm_start
    return Objective(kcs_final * ramp, cfg.norm_penalty * (start + (1.0 - start) * ramp))
