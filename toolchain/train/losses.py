"""Training losses: ArcFace, angular distillation, weighted BCE with a norm penalty."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ArcFaceHead(nn.Module):
    """Additive angular margin (Deng et al., ArcFace): logit_y = s*cos(theta_y + m), others s*cos.

    As in insightface, when theta_y + m would pass pi the target logit falls back to
    cos(theta_y) - m*sin(m), which keeps it monotonic in theta_y.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.scale, self.margin = scale, margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th, self.mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1)).clamp(-1, 1)
        target = cosine.gather(1, labels[:, None])
        sine = (1.0 - target.pow(2)).clamp_min(1e-9).sqrt()
        phi = target * self.cos_m - sine * self.sin_m
        phi = torch.where(target > self.th, phi, target - self.mm)
        logits = cosine.scatter(1, labels[:, None], phi)
        return F.cross_entropy(logits * self.scale, labels)


def angular_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """VarGFaceNet's angular distillation: mean over the batch of (1 - cos(e_teacher, e_student))^2."""
    cos = F.cosine_similarity(student, teacher.detach(), dim=1)
    return (1.0 - cos).pow(2).mean()


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    """BCE with a positive-class weight; None balances it to n_neg / n_pos of this batch."""
    targets = targets.to(logits.dtype)
    if pos_weight is None:
        n_pos = targets.sum().clamp_min(1.0)
        pos_weight = float((targets.numel() - n_pos) / n_pos)
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    # Normalised by the total weight, so the loss scale does not depend on the batch's class mix.
    sample_w = torch.where(targets > 0.5, weight, torch.ones_like(logits))
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (losses * sample_w).sum() / sample_w.sum()
