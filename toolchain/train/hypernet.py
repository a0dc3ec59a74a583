"""Hypernetwork (h_gen) training on top of a frozen backbone h_bb.

Per step (see `sampling` for the batches and `schedule` for the objective schedule):
- P enrollment images give theta_i = h_gen(e_i), e_i their cached h_bb embeddings;
- P*m probe images (randomly mirrored) go through the shared trunk g; every combination is
  scored, logits[i, j] = head(g(b_j); theta_i), positive where the identities match;
- loss = weighted BCE (positive weight n_neg/n_pos unless set)
         + lambda_t * mean_i ||theta_i||^2              (norm penalty; lambda_t from the schedule)
         + trunk_distill * mean_j (1 - cos(W g(b_j), e(b_j)))   (the trunk regresses h_bb's
           embedding through a training-only linear map W, which teaches the tiny trunk identity
           features fast; W is not part of the verifier)
         + score_distill * mean_i KL(softmax_j(cos(e_i, e(b_j)) / T) || softmax_j(logits[i, j]))
           (optional: each user's scores rank the probes as h_bb's cosines do).
Optional before it (`trunk_pretrain_steps`): the trunk alone regresses h_bb's embeddings of
jittered training images. Optional in it: per-user trunk modulation (`verifier_kwargs.film`) and
cohort score normalisation (`cohort_size`; the cohort's trunk features are refreshed every
`cohort_refresh` steps), both inside h_gen's forward (toolchain.models.hypernet).
Speed: h_bb is frozen, so its embeddings (image + mirror, L2-normalised) of every training
image are computed once and cached in `out_dir/embeddings.pt`; a step only runs the tiny trunk.
The images are held in memory as uint8 (37.6 KB each).

Calibration: a share `val_identities` of the identities never takes part in training. After
training, each held-out identity is enrolled from one image; its other images are positives and
the other held-out identities' images negatives, half of the negative weight on each user's
look-alikes (see `calibrate`). The decision threshold (logit >= threshold means "same user") is
the one that maximises balanced accuracy (mean of TPR and TNR) there; it is stored in the
checkpoint with the held-out AUC, EER, TAR and FAR.

The result `out_dir/hypernet.pt` holds h_gen (weights + kwargs), h_bb (weights + kwargs + its
config), the config, the threshold and the calibration numbers: enrollment needs only that file.
`out_dir/last.pt` is the resumable state (h_gen, W, optimizer, scheduler, step).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from toolchain.errors import ToolchainError
from toolchain.models.hypernet import HyperNetwork
from toolchain.atomic import atomic_write_bytes
from toolchain.models.inputs import embed, from_uint8, to_uint8
from toolchain.models.int8_grid import snap_to_int8_grid
from toolchain.models.io import load_model, load_state, save_checkpoint
import toolchain.train.distributed as distributed
from toolchain.train.common import autocast, grad_scaler, cpu_threads, progress_bar, seed_everything, step_rng, warmup_cosine
from toolchain.train.config import HypernetConfig
from toolchain.train.losses import weighted_bce
from toolchain.train.sampling import IdentityBatchSampler, identity_centres
from toolchain.train.schedule import objective_at

FINAL, LAST, CACHE = "hypernet.pt", "last.pt", "embeddings.pt"
_RUNTIME_FIELDS = {"progress", "checkpoint_every", "threads"}


class _Trainable(nn.Module):
    """h_gen + the training-only projection W, one module so that DDP syncs both."""

    def __init__(self, hypernet: HyperNetwork, embedding_dim: int) -> None:
        super().__init__()
        self.hypernet = hypernet
        self.proj = nn.Linear(hypernet.feature_dim, embedding_dim)

    def forward(self, enroll_emb: torch.Tensor, probes: torch.Tensor):
        theta = self.hypernet(enroll_emb)
        feats = self.hypernet.features(probes)
        return theta, feats, self.proj(self.hypernet.pooled(feats))


def _tensor_digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_identity_images(dataset, progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """All images of an identity data set as uint8 (N,3,H,W) plus labels (N,).

    Data sets of toolchain.data expose the raw image (`get_uint8(i)`, HWC uint8): that is used,
    bypassing any training transform. Other data sets are iterated and their normalised float
    images quantised back to uint8 (lossless for images that came from uint8)."""
    if not hasattr(dataset, "num_classes") or not hasattr(dataset, "labels"):
        raise ToolchainError(f"identity data set {type(dataset).__name__} needs .labels and .num_classes")
    n = len(dataset)
    if n == 0:
        raise ToolchainError("identity data set is empty")
    if isinstance(getattr(dataset, "images", None), np.ndarray) and dataset.images.dtype == np.uint8:
        images = torch.from_numpy(np.ascontiguousarray(dataset.images)).permute(0, 3, 1, 2).contiguous()
        return images, np.asarray(dataset.labels, dtype=np.int64)
    if hasattr(dataset, "get_uint8"):
        first = np.asarray(dataset.get_uint8(0))
        images = torch.empty((n, first.shape[2], first.shape[0], first.shape[1]), dtype=torch.uint8)
        with progress_bar("loading images", n, enabled=progress) as advance:
            for i in range(n):
                images[i] = torch.from_numpy(np.ascontiguousarray(dataset.get_uint8(i))).permute(2, 0, 1)
                if i % 256 == 255:
                    advance(256)
        return images, np.asarray(dataset.labels, dtype=np.int64)
    chunks, labels = [], []
    with progress_bar("loading images", n, enabled=progress) as advance:
        for x, y in DataLoader(dataset, batch_size=256, shuffle=False):
            chunks.append(to_uint8(x))
            labels.append(y.numpy())
            advance(len(y))
    return torch.cat(chunks), np.concatenate(labels).astype(np.int64)


def split_identities(labels: np.ndarray, val_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) identities, both among those with >= 2 images; seeded, reproducible."""
    ids, counts = np.unique(labels, return_counts=True)
    usable = ids[counts >= 2]
    if len(usable) < 6:
        raise ToolchainError(f"hypernet training needs >= 6 identities with >= 2 images, got {len(usable)}")
    perm = np.random.default_rng(seed).permutation(usable)
    n_val = max(2, int(round(len(usable) * val_share)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train_hypernet(cfg: HypernetConfig, backbone_ckpt: str | Path, dataset, out_dir: str | Path,
                   resume: bool = True, cache_dir: str | Path | None = None) -> Path:
    """Train h_gen on a frozen backbone; returns `out_dir/hypernet.pt`.

    `cache_dir` (default `out_dir`) holds the h_bb embedding cache; runs on the same backbone
    and data (the ablation's variants) can share it."""
    out_dir = Path(out_dir)
    cache_path = Path(cache_dir or out_dir) / CACHE
    final, last = out_dir / FINAL, out_dir / LAST
    backbone, bb_meta = load_model(backbone_ckpt)
    bb_payload = load_state(backbone_ckpt)
    for p in backbone.parameters():
        p.requires_grad_(False)
    bb_digest = _tensor_digest(bb_payload["state_dict"])

    started = time.perf_counter()
    with distributed.session() as env:
        show = cfg.progress and env.is_main
        images, labels = load_identity_images(dataset, progress=show)
        fingerprint = {"config": cfg.model_dump(exclude=_RUNTIME_FIELDS), "backbone": bb_digest,
                       "num_items": int(len(labels)), "labels": hashlib.sha256(labels.tobytes()).hexdigest()[:16]}
        if resume and final.is_file():
            done = load_state(final)
            if done.get("fingerprint") == fingerprint and done.get("complete"):
                return final
        embeddings = _cached_embeddings(cache_path, backbone, images, fingerprint, env, cfg, show)
        if env.device.type == "cuda":  # uint8 images live on the GPU: a step never waits on a host copy
            images = images.to(env.device)

        train_ids, val_ids = split_identities(labels, cfg.val_identities, cfg.seed)
        centres = identity_centres(embeddings, labels, train_ids) if cfg.kcs else np.zeros((len(train_ids), 1), np.float32)
        sampler = IdentityBatchSampler(labels, train_ids, centres, cfg.identities_per_batch,
                                       cfg.probes_per_identity, seed=cfg.seed, recluster_every=cfg.kcs_recluster_every)

        seed_everything(cfg.seed)
        emb_dim = int(embeddings.shape[1])
        hn_kwargs = {"embedding_dim": emb_dim, "code_dim": cfg.code_dim, "encoder_hidden": cfg.encoder_hidden,
                     "rank": cfg.rank, "verifier_kwargs": dict(cfg.verifier_kwargs), "cohort_size": cfg.cohort_size}
        net = _Trainable(HyperNetwork(**hn_kwargs), emb_dim).to(env.device)
        cohort = _cohort_images(images, labels, train_ids, cfg, env.device)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.steps, min(50, cfg.steps // 10)))
        scaler = grad_scaler(env.device, cfg.amp)
        step, history, earlier_seconds = 0, [], 0.0
        if resume and last.is_file():
            state = load_state(last)
            if state.get("fingerprint") != fingerprint:
                raise ToolchainError(f"{last}: holds a run with another config, backbone or data set; "
                                     "use another output folder or start over (--no-resume, resume=False)")
            net.load_state_dict(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, history = int(state["step"]), list(state["history"])
            earlier_seconds = float(state.get("train_seconds", 0.0))
        # W is unused when trunk_distill = 0; DDP must then not wait for its gradient.
        ddp = DistributedDataParallel(net, find_unused_parameters=cfg.trunk_distill == 0) if env.distributed else net
        emb_dev = embeddings.to(env.device)

        def save_last() -> None:
            save_checkpoint(last, "hypernet", hn_kwargs, net.hypernet.state_dict(), fingerprint=fingerprint,
                            trainable=net.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), step=step, history=history, complete=False,
                            train_seconds=earlier_seconds + time.perf_counter() - started)

        grid_from = cfg.steps - int(round(cfg.steps * cfg.trunk_int8_grid))
        net.train()
        if step == 0 and cfg.trunk_pretrain_steps:
            pretrain_trunk(net, images, emb_dev, train_ids, labels, cfg, env, show)
        with cpu_threads(cfg.threads if env.device.type == "cpu" else None), \
                progress_bar("hypernet", cfg.steps, completed=step, enabled=show) as advance:
            while step < cfg.steps:
                if cohort is not None and step % cfg.cohort_refresh == 0:
                    net.hypernet.set_cohort(cohort)  # the trunk moves: its cohort features follow
                rng = step_rng(cfg.seed, step, env.rank)
                objective = objective_at(cfg, step)
                use_kcs = bool(rng.random() < objective.kcs_prob)
                batch = sampler.sample(rng, step, use_kcs)
                probes = images[torch.as_tensor(batch.probes)]
                if cfg.hflip:
                    flip = torch.as_tensor(rng.random(len(batch.probes)) < 0.5, device=probes.device)
                    probes = torch.where(flip[:, None, None, None], probes.flip(3), probes)
                probes = from_uint8(probes, cfg.channels_last).to(env.device)
                with autocast(env.device, cfg.amp):
                    theta, feats, pred = ddp(emb_dev[torch.as_tensor(batch.enroll)], probes)
                    logits = HyperNetwork.score_matrix(theta, feats)
                logits, pred = logits.float(), pred.float()
                theta = {k: v.float() for k, v in theta.items()}
                targets = torch.as_tensor(batch.probe_owner, device=env.device)[None, :] == \
                    torch.arange(len(batch.enroll), device=env.device)[:, None]
                bce = weighted_bce(logits, targets, cfg.pos_weight)
                loss = bce
                if objective.norm_weight > 0:
                    loss = loss + objective.norm_weight * HyperNetwork.theta_sq_norm(theta).mean()
                if cfg.trunk_distill > 0:
                    cos = F.cosine_similarity(pred, emb_dev[torch.as_tensor(batch.probes)], dim=1)
                    loss = loss + cfg.trunk_distill * (1.0 - cos).mean()
                if cfg.score_distill > 0:
                    # Each user's ranking of the batch's probes follows h_bb's cosine ranking.
                    teacher = emb_dev[torch.as_tensor(batch.enroll)] @ emb_dev[torch.as_tensor(batch.probes)].T
                    loss = loss + cfg.score_distill * F.kl_div(
                        F.log_softmax(logits, dim=1), F.log_softmax(teacher / cfg.score_distill_temperature, dim=1),
                        log_target=True, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if cfg.trunk_int8_grid and step >= grid_from:
                    # Projected steps: late in the cosine schedule an update is below one grid step,
                    # so the trunk stays put while the generator adapts to it.
                    snap_to_int8_grid(net.hypernet.trunk)
                step += 1
                history.append({"loss": float(loss.detach()), "bce": float(bce.detach()), "kcs": use_kcs})
                advance(1, loss=history[-1]["loss"], bce=history[-1]["bce"])
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    if env.is_main:
                        save_last()
                    env.barrier()

        if cohort is not None:
            net.hypernet.set_cohort(cohort)  # the final trunk's features
        if env.is_main:
            net.eval()
            calibration = calibrate(net.hypernet, images, labels, embeddings, val_ids, seed=cfg.seed,
                                    channels_last=cfg.channels_last)
            backbone_entry = {"model": bb_meta["model"], "model_kwargs": bb_meta.get("model_kwargs", {}),
                              "state_dict": bb_payload["state_dict"], "config": bb_payload.get("config", {}),
                              "digest": bb_digest}
            save_checkpoint(final, "hypernet", hn_kwargs, net.hypernet.state_dict(), backbone=backbone_entry,
                            config=cfg.model_dump(), fingerprint=fingerprint, threshold=calibration["threshold"],
                            calibration=calibration, history=history, embedding={"flip": True},
                            train_identities=int(len(train_ids)), val_identities=[int(i) for i in val_ids],
                            train_seconds=round(earlier_seconds + time.perf_counter() - started, 1), complete=True)
        env.barrier()
        return final


def _shifted(images: torch.Tensor, rng: np.random.Generator, max_shift: int) -> torch.Tensor:
    """Each uint8 image (N,3,H,W) moved by up to `max_shift` pixels (edge pixels repeated) and
    randomly mirrored: small alignment jitter, which does not change who it is."""
    n, _, h, w = images.shape
    padded = F.pad(images.float(), (max_shift,) * 4, mode="replicate")
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]).to(torch.uint8)
    flip = torch.as_tensor(rng.random(n) < 0.5, device=out.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def pretrain_trunk(net: "_Trainable", images: torch.Tensor, embeddings: torch.Tensor, train_ids: np.ndarray,
                   labels: np.ndarray, cfg: HypernetConfig, env, show: bool) -> None:
    """Distillation before the hypernetwork: the trunk (through the training-only map W) regresses
    h_bb's cached embedding of jittered training images, `trunk_pretrain_steps` steps of
    `trunk_pretrain_batch` images. Only the trunk and W learn here (cosine loss). Not resumable
    on its own: an interrupted pretraining starts again."""
    pool = np.flatnonzero(np.isin(labels, train_ids))
    params = list(net.hypernet.trunk.parameters()) + list(net.proj.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.trunk_pretrain_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, min(50, total // 10)))
    with cpu_threads(cfg.threads if env.device.type == "cpu" else None), \
            progress_bar("trunk pretraining", total, enabled=show) as advance:
        for step in range(total):
            rng = step_rng(cfg.seed, 10_000_000 + step, env.rank)
            pick = torch.as_tensor(rng.choice(pool, min(cfg.trunk_pretrain_batch, len(pool)), replace=False))
            x = from_uint8(_shifted(images[pick], rng, 4), cfg.channels_last).to(env.device)
            with autocast(env.device, cfg.amp):
                pred = net.proj(net.hypernet.pooled(net.hypernet.features(x)))
            loss = (1.0 - F.cosine_similarity(pred.float(), embeddings[pick.to(embeddings.device)], dim=1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if env.distributed:  # outside DDP's wrapper: average the gradients by hand
                for p in params:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= env.world_size
            optimizer.step()
            scheduler.step()
            advance(1, distill=float(loss.detach()))


def _cohort_images(images: torch.Tensor, labels: np.ndarray, train_ids: np.ndarray, cfg: HypernetConfig,
                   device) -> torch.Tensor | None:
    """`cohort_size` training images (seeded, one per identity while they last): the impostor
    cohort of score normalisation, or None when it is off."""
    if not cfg.cohort_size:
        return None
    rng = np.random.default_rng(cfg.seed + 7)
    ids = rng.permutation(train_ids)
    picks = [int(rng.choice(np.flatnonzero(labels == ids[k % len(ids)]))) for k in range(cfg.cohort_size)]
    return from_uint8(images[torch.as_tensor(picks)], cfg.channels_last).to(device)


def _cached_embeddings(path: Path, backbone: nn.Module, images: torch.Tensor, fingerprint: dict, env,
                       cfg: HypernetConfig, show: bool) -> torch.Tensor:
    """h_bb embeddings of every image (image + mirror, L2-normalised), computed once per
    (backbone, data set) and kept in `path`."""
    key = {"backbone": fingerprint["backbone"], "labels": fingerprint["labels"], "num_items": fingerprint["num_items"]}
    if path.is_file():
        cached = load_state(path)
        if cached.get("key") == key:
            return cached["embeddings"]
    backbone = backbone.to(env.device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    chunks, bs = [], 128
    with progress_bar("embedding cache", len(images), enabled=show) as advance:
        for start in range(0, len(images), bs):
            chunks.append(embed(backbone, images[start:start + bs], flip=True, channels_last=cfg.channels_last,
                                device=env.device))
            advance(len(chunks[-1]))
    embeddings = torch.cat(chunks)
    if env.is_main:
        atomic_write_bytes(path, lambda tmp: torch.save({"key": key, "embeddings": embeddings}, tmp))
    return embeddings


@torch.no_grad()
def calibrate(hypernet: HyperNetwork, images: torch.Tensor, labels: np.ndarray, embeddings: torch.Tensor,
              identities: np.ndarray, seed: int = 0, max_probes: int = 10, channels_last: bool = True,
              look_alikes: int = 3) -> dict:
    """Decision threshold from held-out identities (see the module docstring).

    Every held-out identity is enrolled from one image; its other images are positives, all other
    held-out images negatives. Negatives are weighted so that, per user, half of the negative
    weight lies on its `look_alikes` most similar held-out identities (nearest identity centres in
    h_bb's space) and half on the rest: verification sets (and the synthetic benchmark) build
    half of their mismatched pairs from look-alikes, and an unweighted threshold, set mostly by
    easy negatives, would accept too many of them. The threshold maximises the weighted balanced
    accuracy (TPR + weighted TNR) / 2."""
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed + 1)
    enroll, probes, owner = [], [], []
    for row, ident in enumerate(identities):
        items = rng.permutation(np.flatnonzero(labels == ident))
        enroll.append(items[0])
        probes.extend(items[1:1 + max_probes].tolist())
        owner.extend([row] * len(items[1:1 + max_probes]))
    owner = np.asarray(owner)
    device = next(hypernet.parameters()).device
    theta = hypernet(embeddings[torch.as_tensor(enroll)].to(device))
    feats = torch.cat([hypernet.features(from_uint8(images[torch.as_tensor(probes[i:i + 256])], channels_last).to(device))
                       for i in range(0, len(probes), 256)])
    scores = HyperNetwork.score_matrix(theta, feats).cpu().numpy()
    same = owner[None, :] == np.arange(len(enroll))[:, None]

    centres = identity_centres(embeddings, labels, identities)
    sim = centres @ centres.T
    np.fill_diagonal(sim, -np.inf)
    k = min(look_alikes, len(identities) - 1)
    nearest = np.argsort(-sim, axis=1)[:, :k]
    hard = np.zeros_like(same)
    for row in range(len(enroll)):
        hard[row] = np.isin(owner, nearest[row])
    weights = np.ones(same.shape)
    easy = ~same & ~hard
    for row in range(len(enroll)):
        n_hard, n_easy = hard[row].sum(), easy[row].sum()
        if n_hard and n_easy:
            weights[row, hard[row]] = 0.5 / n_hard
            weights[row, easy[row]] = 0.5 / n_easy
        elif n_hard or n_easy:
            weights[row, hard[row] | easy[row]] = 1.0 / (n_hard + n_easy)
    threshold, balanced = best_threshold(scores.ravel(), same.ravel(), weights.ravel())
    fpr, tpr, _ = roc_curve(same.ravel(), scores.ravel())
    eer_idx = int(np.argmin(np.abs(fpr - (1 - tpr))))
    accept = scores >= threshold
    return {"threshold": threshold, "balanced_accuracy": balanced,
            "tar": float(accept[same].mean()), "far": float(accept[~same].mean()),
            "far_look_alikes": float(accept[hard].mean()) if hard.any() else float("nan"),
            "auc": float(roc_auc_score(same.ravel(), scores.ravel())),
            "eer": float((fpr[eer_idx] + 1 - tpr[eer_idx]) / 2), "identities": int(len(identities)),
            "positives": int(same.sum()), "negatives": int((~same).sum()),
            "rule": "logit >= threshold; max balanced accuracy, half the negative weight on look-alikes"}


def best_threshold(scores: np.ndarray, same: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(threshold, balanced accuracy) maximising (TPR + TNR) / 2 for the rule score >= threshold,
    with optional per-sample weights; the threshold sits midway between neighbouring scores."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, np.float64)
    n_pos, n_neg = w[same].sum(), w[~same].sum()
    if not same.any() or same.all() or n_pos <= 0 or n_neg <= 0:
        raise ToolchainError("calibration needs both positive and negative pairs")
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], same[order], w[order]
    tp = np.cumsum(np.where(y, w, 0.0))  # predicting positive for the first k+1 scores
    fp = np.cumsum(np.where(y, 0.0, w))
    balanced = 0.5 * (tp / n_pos + 1 - fp / n_neg)
    # Only cut between distinct scores.
    valid = np.append(s[1:] < s[:-1], True)
    balanced = np.where(valid, balanced, -1)
    k = int(np.argmax(balanced))
    threshold = s[k] if k == len(s) - 1 else 0.5 * (s[k] + s[k + 1])
    # Predicting all negative (threshold above the top score) is balanced accuracy 0.5.
    if balanced[k] < 0.5:
        return float(s[0] + 1.0), 0.5
    return float(threshold), float(balanced[k])
