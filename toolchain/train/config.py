"""Typed training configurations (pydantic, extra="forbid") that recipes embed.

Defaults are the demo-sized settings of the default recipe: they train on 2 CPU cores within the
demo's time budget. Real-data runs raise `epochs`, `embedding_size` and the step counts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistillConfig(_Config):
    """Angular distillation from a frozen teacher (VarGFaceNet, SPEC section 3).

    loss += weight * mean(||1 - cos(e_teacher, e_student)||^2). With `generations` > 1 the
    distillation is recursive: the student of generation g initialises the student of g+1,
    while the teacher stays the same.
    """

    teacher: str = Field(description="path of the teacher's checkpoint (a backbone .pt)")
    weight: float = Field(7.0, ge=0.0)
    generations: int = Field(1, ge=1)


class BackboneConfig(_Config):
    """h_bb: a zoo embedding model trained with an ArcFace (additive angular margin) head."""

    model: str = "mobilefacenet"
    embedding_size: int = Field(128, ge=8)
    model_kwargs: dict = Field(default_factory=dict, description="extra builder arguments")
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=0, description="stop after this many steps (overrides epochs; "
                                  "0: no training, `init` is the model)")
    max_seconds: float | None = Field(None, gt=0, description="stop after this much training time; the "
                                      "learning-rate schedule then follows whichever of steps and time is "
                                      "further along (the step count depends on the machine)")
    init: str | None = Field(None, description="backbone checkpoint (.pt) to start from; in a recipe file, "
                             "relative to the recipe")
    batch_size: int = Field(64, ge=2, description="global batch; each of N ranks takes batch_size/N")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    # ArcFace: cos(theta + m) for the true class, everything scaled by s (insightface: s=64,
    # m=0.5; the small demo data converge faster with a gentler s=32, m=0.4).
    arcface_scale: float = Field(32.0, gt=0)
    arcface_margin: float = Field(0.4, ge=0, lt=1.5)
    hflip: bool = Field(True, description="random horizontal flip augmentation")
    channels_last: bool = Field(True, description="NHWC memory format: about 2x faster on CPU")
    distill: DistillConfig | None = None
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision of the training step")
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
    num_workers: int = Field(0, ge=0)
    progress: bool = True

    @model_validator(mode="after")
    def _zero_steps_need_init(self) -> "BackboneConfig":
        if self.max_steps == 0 and not self.init:
            raise ValueError("max_steps 0 trains nothing: it needs init (a trained backbone checkpoint)")
        return self


class HypernetConfig(_Config):
    """h_gen and its training objective. KCS, the norm penalty and the schedule can each be
    switched off for the ablation (`kcs=False`, `norm_penalty=0`, `schedule=False`)."""

    # --- architecture (toolchain.models.hypernet.HyperNetwork) ---
    code_dim: int = Field(64, ge=1, description="size of the code z that drives every generated layer")
    encoder_hidden: int = Field(256, ge=1)
    rank: int = Field(8, ge=0, description="rank of the generated first-layer update (0 = full linear map)")
    verifier_kwargs: dict = Field(default_factory=dict, description="arguments of the `verifier` model "
                                  "(film: true makes the trunk's last conv per-user)")
    cohort_size: int = Field(0, ge=0, description="impostor cohort of per-user score normalisation (0 = off)")
    cohort_refresh: int = Field(25, ge=1, description="steps between refreshes of the cohort's trunk features")
    # --- batches ---
    steps: int = Field(1500, ge=1)
    identities_per_batch: int = Field(32, ge=2, description="P: enrollment identities per batch")
    probes_per_identity: int = Field(2, ge=1, description="probe images per identity (besides the enrollment one)")
    # --- objective ---
    pos_weight: float | None = Field(None, gt=0, description="BCE positive-class weight; None = n_neg/n_pos of the batch")
    norm_penalty: float = Field(1e-4, ge=0, description="lambda of lambda*||theta_generated||^2; 0 = off")
    trunk_distill: float = Field(1.0, ge=0, description="weight of the trunk's cosine regression onto h_bb's embedding; 0 = off")
    score_distill: float = Field(0.0, ge=0, description="weight of the per-user scores' listwise distillation "
                                 "from h_bb's cosines (KL of the softmax over each user's probes; 0 = off)")
    score_distill_temperature: float = Field(0.1, gt=0, description="temperature of h_bb's cosines in score_distill")
    trunk_pretrain_steps: int = Field(0, ge=0, description="distillation-only steps of the trunk before h_gen trains (0 = off)")
    trunk_pretrain_batch: int = Field(256, ge=2, description="images per trunk pretraining step")
    kcs: bool = Field(True, description="K-means Centered Sampling of hard-negative batches")
    kcs_fraction: float = Field(0.75, ge=0, le=1, description="share of KCS batches once fully phased in")
    kcs_recluster_every: int = Field(200, ge=1, description="steps between k-means re-runs (new seed)")
    schedule: bool = Field(True, description="objective schedule: random batches + small norm weight first")
    schedule_warmup: float = Field(0.3, ge=0, le=1, description="fraction of steps with random batches only")
    schedule_ramp: float = Field(0.3, ge=0, le=1, description="fraction of steps over which KCS and lambda ramp up")
    schedule_norm_start: float = Field(0.1, ge=0, le=1, description="lambda factor during the warm-up")
    # --- optimisation ---
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hflip: bool = True
    channels_last: bool = True
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision of the training step")
    # --- calibration on held-out identities ---
    val_identities: float = Field(0.1, gt=0, lt=1, description="share of identities held out for the threshold")
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    trunk_int8_grid: float = Field(
        0.1, ge=0, lt=1,
        description="final share of the steps with the shared trunk held on the int8 weight grid, so int8 "
                    "export adds no weight error there; the generator adapts to it (0 = off)")
    # A step is a few hundred tiny ops: on CPU a second intra-op thread costs more in
    # synchronisation than it gains (measured: 1 thread several times faster on 2 cores).
    threads: int | None = Field(1, ge=1, description="CPU threads of the training loop (None: torch's default)")
    progress: bool = True

    @model_validator(mode="after")
    def _phases_fit(self) -> "HypernetConfig":
        if self.schedule_warmup + self.schedule_ramp > 1:
            raise ValueError("schedule_warmup + schedule_ramp must not exceed 1")
        return self
