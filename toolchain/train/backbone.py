"""Backbone (h_bb) training: a zoo embedding model + ArcFace head on an identity data set.

- Data: any map-style data set whose items are (normalised float tensor 3x112x112, int label) and
  that has `.labels` and `.num_classes` (the synthetic default, RecordIO, image folders).
- Optional start from a trained checkpoint (`init`; with `max_steps: 0` it is the model as is),
  and an optional time budget (`max_seconds`) that the learning-rate schedule follows.
- Optional angular distillation from a frozen teacher, recursive over generations (SPEC section 3).
- Resumable: every `checkpoint_every` steps `last.pt` (model, ArcFace head, optimizer, scheduler,
  step, torch RNG state, config) is written atomically; a rerun with the same config continues
  from it. Batches are a function of (seed, epoch) through `DistributedSampler`, so the resumed
  run sees exactly the batches the uninterrupted run would have (with num_workers=0 also the same
  flips, since the RNG state is restored).
- The same code runs plain and under `torchrun --nproc_per_node=N` (DDP; gloo on CPU, nccl on GPU):
  each rank takes batch_size/N of every global batch; only rank 0 writes files and shows progress.

Outputs in `out_dir`: `backbone.pt` (final; loadable with `toolchain.models.io.load_model`; holds
the config under "config") and `last.pt` (the resumable state).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from toolchain.errors import ToolchainError
from toolchain.models import build_model, get_spec
from toolchain.models.io import load_model, load_state, save_checkpoint
import toolchain.train.distributed as distributed
from toolchain.train.common import autocast, grad_scaler, progress_bar, seed_everything, warmup_cosine
from toolchain.train.config import BackboneConfig
from toolchain.train.losses import ArcFaceHead, angular_distillation

FINAL, LAST = "backbone.pt", "last.pt"
# Config fields that may change between an interrupted run and its resumption.
_RUNTIME_FIELDS = {"progress", "num_workers", "checkpoint_every"}


class _ArcFaceNet(nn.Module):
    """Backbone + ArcFace head in one module, so DDP synchronises both."""

    def __init__(self, backbone: nn.Module, head: ArcFaceHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.backbone(x)
        # The margin arithmetic stays in float32 under mixed precision (cos near 1 needs it).
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.head(emb.float(), y), emb


def _fingerprint(cfg: BackboneConfig, dataset) -> dict:
    # The starting weights by content: a changed checkpoint file under the same name retrains.
    init = {"init_sha256": hashlib.sha256(Path(cfg.init).read_bytes()).hexdigest()} if cfg.init else {}
    return {"config": cfg.model_dump(exclude=_RUNTIME_FIELDS),
            "num_items": len(dataset), "num_classes": int(dataset.num_classes), **init}


def _check_dataset(dataset) -> None:
    for attr in ("labels", "num_classes"):
        if not hasattr(dataset, attr):
            raise ToolchainError(f"identity data set {type(dataset).__name__} has no .{attr}")
    if len(dataset) == 0 or int(dataset.num_classes) < 2:
        raise ToolchainError("identity data set needs at least 2 identities and 1 image")


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, BN and PReLU (1-d tensors), as in the reference code."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(cfg: BackboneConfig, module: nn.Module) -> torch.optim.Optimizer:
    groups = _param_groups(module, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train_backbone(cfg: BackboneConfig, dataset, out_dir: str | Path, resume: bool = True) -> Path:
    """Train h_bb; returns the path of the final checkpoint (`out_dir/backbone.pt`).

    With `cfg.distill.generations = G > 1`, generations 1..G-1 go to `out_dir/gen<g>/` and the
    last one to `out_dir`; each student starts from the previous generation's weights.
    """
    _check_dataset(dataset)
    out_dir = Path(out_dir)
    generations = cfg.distill.generations if cfg.distill else 1
    init: Path | None = Path(cfg.init) if cfg.init else None
    if init is not None and not init.is_file():
        raise ToolchainError(f"train.backbone.init: {init}: no such checkpoint")
    for gen in range(1, generations + 1):
        gen_dir = out_dir if gen == generations else out_dir / f"gen{gen}"
        init = _train_generation(cfg, dataset, gen_dir, resume, init_from=init, generation=gen)
    return init


def _train_generation(cfg: BackboneConfig, dataset, out_dir: Path, resume: bool, init_from: Path | None,
                      generation: int) -> Path:
    final, last = out_dir / FINAL, out_dir / LAST
    fingerprint = _fingerprint(cfg, dataset) | {"generation": generation}
    with distributed.session() as env:
        if resume and final.is_file():
            done = load_state(final)
            if done.get("fingerprint") == fingerprint:
                return final
        state = None
        if resume and last.is_file():
            state = load_state(last)
            if state.get("fingerprint") != fingerprint:
                raise ToolchainError(f"{last}: holds a run with another config or data set; "
                                     "use another output folder or start over (--no-resume, resume=False)")
        seed_everything(cfg.seed + 1000 * generation)

        check_backbone_model(cfg.model)
        model_kwargs = {"embedding_size": cfg.embedding_size, **cfg.model_kwargs}
        backbone = build_model(cfg.model, **model_kwargs)
        if init_from is not None and state is None:  # cfg.init, or recursive distillation: student g-1 -> g
            _load_init(backbone, init_from, cfg)
        head = ArcFaceHead(cfg.embedding_size, int(dataset.num_classes), cfg.arcface_scale, cfg.arcface_margin)
        net = _ArcFaceNet(backbone, head).to(env.device)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        teacher = _load_teacher(cfg, env) if cfg.distill else None

        per_rank = cfg.batch_size // env.world_size
        if per_rank < 2:
            raise ToolchainError(f"batch_size {cfg.batch_size} is too small for {env.world_size} processes")
        sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        steps_per_epoch = len(sampler) // per_rank
        if steps_per_epoch == 0:
            raise ToolchainError(f"data set of {len(dataset)} images is smaller than one batch of {cfg.batch_size}")
        total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

        optimizer = _make_optimizer(cfg, net)
        scaler = grad_scaler(env.device, cfg.amp)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, cfg.warmup_steps))
        step, history, elapsed = 0, [], 0.0
        if state is not None:
            net.backbone.load_state_dict(state["state_dict"])
            net.head.load_state_dict(state["arcface"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, history = int(state["step"]), list(state["history"])
            elapsed = float(state.get("elapsed", 0.0))
            torch.set_rng_state(state["rng_state"])
        clock = _Budget(cfg.max_seconds, elapsed, total, cfg.warmup_steps)
        ddp = DistributedDataParallel(net) if env.distributed else net

        def save(path: Path, complete: bool) -> None:
            extra = {"fingerprint": fingerprint, "config": cfg.model_dump(), "step": step, "history": history,
                     "num_classes": int(dataset.num_classes), "complete": complete, "generation": generation,
                     "elapsed": clock.elapsed()}
            if not complete:
                extra |= {"arcface": net.head.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "rng_state": torch.get_rng_state()}
            save_checkpoint(path, cfg.model, model_kwargs, net.backbone.state_dict(), **extra)

        label = f"backbone {cfg.model}" + (f" gen {generation}" if cfg.distill else "")
        net.train()
        with progress_bar(label, total, completed=step, enabled=cfg.progress and env.is_main) as advance:
            while step < total:
                epoch, offset = divmod(step, steps_per_epoch)
                sampler.set_epoch(epoch)
                indices = list(sampler)
                batches = [indices[i * per_rank:(i + 1) * per_rank] for i in range(offset, steps_per_epoch)]
                # Its own generator: creating an iterator draws a seed, which must not advance the
                # global RNG (a resumed run creates its iterator mid-epoch).
                gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
                loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, generator=gen,
                                    pin_memory=env.device.type == "cuda",
                                    persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
                for images, labels in loader:
                    with autocast(env.device, cfg.amp):
                        loss, parts = _step(cfg, ddp, teacher, images, labels, env.device)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    if clock.limited and clock.follow(optimizer, step, env):
                        total = step  # the time budget is spent: this step is the last one
                    history.append(float(loss.detach()))
                    advance(1, loss=history[-1], **parts)
                    if step % cfg.checkpoint_every == 0 or step == total:
                        if env.is_main:
                            save(last, complete=False)
                        env.barrier()
                    if step >= total:
                        break
        if env.is_main:
            save(final, complete=True)
        env.barrier()
        return final


def check_backbone_model(name: str) -> None:
    """`name` is a registered model whose output is an embedding, what ArcFace trains."""
    spec = get_spec(name)
    if spec.output != "embedding":
        raise ToolchainError(f"model {name!r} is not a backbone (its output is a {spec.output}, not an embedding)")


def read_init(path: str | Path, model: str) -> dict:
    """The checkpoint a backbone of `model` starts from, loaded (weights only); one of another
    model is a clear error. Its fit to the embedding size is checked when it is loaded."""
    payload = load_state(path)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ToolchainError(f"{path}: not a toolchain backbone checkpoint (needs 'state_dict')")
    if payload.get("model", model) != model:
        raise ToolchainError(f"{path}: holds model {payload['model']!r}, the config trains {model!r}")
    return payload


def _load_init(backbone: nn.Module, path: Path, cfg: BackboneConfig) -> None:
    """Start from a checkpoint's weights; a checkpoint of another model or size is a clear error."""
    payload = read_init(path, cfg.model)
    try:
        backbone.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ToolchainError(f"{path}: weights do not fit {cfg.model} with embedding_size {cfg.embedding_size}: "
                             f"{str(exc).splitlines()[0]}") from exc


class _Budget:
    """`max_seconds`: the training clock, and the learning rate that follows it. The schedule's
    position is whichever of step / total and time / budget is further along, so a run stopped by
    the clock still ends its cosine decay near zero."""

    def __init__(self, seconds: float | None, elapsed: float, total: int, warmup: int) -> None:
        self.seconds, self.total, self.limited = seconds, total, seconds is not None
        self.factor = warmup_cosine(total, warmup)
        self._start = time.monotonic() - elapsed

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def follow(self, optimizer: torch.optim.Optimizer, step: int, env) -> bool:
        """Set the next step's learning rate; True when the time budget is spent. Under DDP the
        ranks' clocks are averaged, so every rank takes the same rate and stops at the same step."""
        share = distributed.all_reduce_mean(env, self.elapsed() / self.seconds)
        position = max(step, int(share * self.total))
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.factor(position)
        return share >= 1.0


def _load_teacher(cfg: BackboneConfig, env) -> nn.Module:
    teacher, meta = load_model(cfg.distill.teacher)
    if getattr(teacher, "spec", None) is not None and teacher.spec.output != "embedding":
        raise ToolchainError(f"{cfg.distill.teacher}: teacher {meta['model']!r} is not an embedding model")
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher = teacher.eval().to(env.device)
    return teacher.to(memory_format=torch.channels_last) if cfg.channels_last else teacher


def _step(cfg: BackboneConfig, net, teacher, images, labels, device) -> tuple[torch.Tensor, dict]:
    images, labels = images.to(device), labels.to(device).long()
    if cfg.hflip:  # per-sample random mirror, from the (checkpointed) torch RNG
        flip = torch.rand(images.shape[0]) < 0.5
        images = torch.where(flip.to(device)[:, None, None, None], images.flip(3), images)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    arc, emb = net(images, labels)
    if teacher is None:
        return arc, {}
    with torch.no_grad():
        t_emb = teacher(images)
    if t_emb.shape[1] != emb.shape[1]:
        raise ToolchainError(f"teacher embedding size {t_emb.shape[1]} != student embedding size {emb.shape[1]}")
    kd = angular_distillation(emb, t_emb)
    return arc + cfg.distill.weight * kd, {"arcface": float(arc.detach()), "distill": float(kd.detach())}
