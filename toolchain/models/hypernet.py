"""h_gen: the hypernetwork that writes a user's verifier f(x; theta) from a face embedding.

Design (SPEC section 1 leaves it to the project):
- The verifier's `features` trunk is h_gen's learned base. The `head` (Linear(F,H), ReLU,
  Linear(H,1); about 6.3k weights for F=96, H=64) is generated per user; with the verifier's
  `film` the trunk's last conv is per-user too (a generated scale and shift per channel).
- Optional cohort score normalisation (`cohort_size`): every user's logit is standardised on a
  fixed impostor cohort, folded into the head's last layer.
- embedding e (L2-normalised output of the frozen backbone h_bb) -> encoder MLP -> code z.
  Each head tensor is a learned base plus a generated update driven by z:
    W1 = B1 + U(z) V(z)^T / sqrt(r)   (U: H x r, V: F x r, both linear in z; r = `rank`)
    b1 = c1 + L_b1(z),  w2 = B2 + L_w2(z),  b2 = c2 + L_b2(z)
  so a head of H*F+2H+1 weights needs about code*(r*(H+F)+2H+1) generator weights instead of
  a 512 x 8.3k matrix. With rank=0 the W1 update is a full linear map of z.
- The update layers start at zero, so at initialisation every user gets the base head.

Not in the model registry: h_gen takes an embedding rather than a 112x112 crop and is never
exported; only the verifiers it writes are. Its checkpoints are read by
`toolchain.train.hypernet.load_hypernet`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from toolchain.models.verifier import HEAD_PREFIX, Verifier

# Names of the generated tensors, as in the verifier's state dict.
W1, B1, W2, B2 = (f"{HEAD_PREFIX}0.weight", f"{HEAD_PREFIX}0.bias", f"{HEAD_PREFIX}2.weight", f"{HEAD_PREFIX}2.bias")
# With film: per-user scale and shift of the trunk's last conv channels, (B, F) each; folded into
# that conv's weight and bias when a verifier is built (`verifier_state_dict`).
FILM_SCALE, FILM_SHIFT = "film.scale", "film.shift"
_USER_CHUNK = 16  # users scored at once against many probes when the trunk is per-user (memory)


class HyperNetwork(nn.Module):
    def __init__(self, embedding_dim: int, code_dim: int = 64, encoder_hidden: int = 256, rank: int = 8,
                 verifier_kwargs: dict | None = None, cohort_size: int = 0) -> None:
        super().__init__()
        self.verifier_kwargs = dict(verifier_kwargs or {})
        base = Verifier(**self.verifier_kwargs)
        self.film = base.film
        self.trunk = base.features  # learned base of every user's trunk
        # The trunk has no normalisation layers (int8-first), so PyTorch's default conv init
        # shrinks the signal ~2x per layer and the features come out constant; He init
        # (fan_in, ReLU) keeps their scale through the depth.
        for m in self.trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.feature_dim, self.hidden_dim = base.feature_dim, base.hidden_dim
        self.embedding_dim, self.rank = embedding_dim, rank
        # Learned base of the head: every generated head is base + update(z).
        self.base_w1 = nn.Parameter(base.head[0].weight.detach().clone())
        self.base_b1 = nn.Parameter(base.head[0].bias.detach().clone())
        self.base_w2 = nn.Parameter(base.head[2].weight.detach().clone())
        self.base_b2 = nn.Parameter(base.head[2].bias.detach().clone())
        self.encoder = nn.Sequential(
            nn.Linear(embedding_dim, encoder_hidden), nn.LayerNorm(encoder_hidden), nn.ReLU(),
            nn.Linear(encoder_hidden, code_dim), nn.LayerNorm(code_dim),
        )
        h, f = self.hidden_dim, self.feature_dim
        if rank > 0:
            self.gen_u = nn.Linear(code_dim, h * rank)
            self.gen_v = nn.Linear(code_dim, f * rank)
            # U starts at zero (update = 0), V random, so gradients reach U from step one.
            nn.init.zeros_(self.gen_u.weight)
            nn.init.zeros_(self.gen_u.bias)
        else:
            self.gen_w1 = nn.Linear(code_dim, h * f)
            nn.init.zeros_(self.gen_w1.weight)
            nn.init.zeros_(self.gen_w1.bias)
        self.gen_b1 = nn.Linear(code_dim, h)
        self.gen_w2 = nn.Linear(code_dim, h)
        self.gen_b2 = nn.Linear(code_dim, 1)
        zero_init = [self.gen_b1, self.gen_w2, self.gen_b2]
        if self.film:
            self.gen_film = nn.Linear(code_dim, 2 * f)  # (scale - 1, shift) per channel
            zero_init.append(self.gen_film)
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # Cohort score normalisation: each user's logit is standardised by the mean and std of
        # that user's logits on a fixed cohort of impostor images (their trunk features are kept
        # here), so that one global threshold fits every user. Folded into the head's last layer.
        self.cohort_size = int(cohort_size)
        if self.cohort_size:
            with torch.no_grad():
                shape = self.features(torch.zeros(1, 3, 112, 112)).shape[1:]
            self.register_buffer("cohort", torch.zeros(self.cohort_size, *shape))
            self.register_buffer("cohort_ready", torch.zeros((), dtype=torch.bool))
            # A learned global affine map of the standardised score, the same for every user: the
            # cohort's mean is 0 by construction, and impostors must still be able to score
            # below the decision threshold (BCE pushes them down through this offset).
            self.cohort_scale = nn.Parameter(torch.ones(()))
            self.cohort_offset = nn.Parameter(torch.full((), -2.0))

    # -- generation -------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batched per-user weights theta_i for B embeddings: {name: (B, *shape)}."""
        z = self.encoder(F.normalize(embeddings, dim=1))
        n, h, f = z.shape[0], self.hidden_dim, self.feature_dim
        if self.rank > 0:
            u = self.gen_u(z).view(n, h, self.rank)
            v = self.gen_v(z).view(n, f, self.rank)
            dw1 = torch.bmm(u, v.transpose(1, 2)) / math.sqrt(self.rank)
        else:
            dw1 = self.gen_w1(z).view(n, h, f)
        theta = {
            W1: self.base_w1 + dw1,
            B1: self.base_b1 + self.gen_b1(z),
            W2: self.base_w2 + self.gen_w2(z).view(n, 1, h),
            B2: self.base_b2 + self.gen_b2(z),
        }
        if self.film:
            film = self.gen_film(z)
            theta[FILM_SCALE], theta[FILM_SHIFT] = 1.0 + film[:, :f], film[:, f:]
        if self.cohort_size and bool(self.cohort_ready):
            cohort = self.score_matrix(theta, self.cohort)  # (B, K) logits on impostors
            mean, std = cohort.mean(1), cohort.std(1).clamp_min(1e-3)
            gain = self.cohort_scale / std  # logit = scale * (raw - mean) / std + offset
            theta[W2] = theta[W2] * gain[:, None, None]
            theta[B2] = (theta[B2] - mean[:, None]) * gain[:, None] + self.cohort_offset
        return theta

    @torch.no_grad()
    def set_cohort(self, images: torch.Tensor) -> None:
        """Keep the trunk features of these normalised impostor images as the cohort."""
        if not self.cohort_size:
            return
        if len(images) != self.cohort_size:
            raise ValueError(f"cohort needs {self.cohort_size} images, got {len(images)}")
        self.cohort.copy_(self.features(images))
        self.cohort_ready.fill_(True)

    # -- scoring with generated weights ---------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the scorers take for normalised images (N, 3, 112, 112): the pooled trunk
        features (N, F), or with film the last conv's pre-activation maps (N, F, h, w), which
        each user's scale and shift modulate."""
        if self.film:
            return self.trunk[:Verifier.LAST_CONV + 1](images)
        return self.trunk(images)

    def pooled(self, feats: torch.Tensor) -> torch.Tensor:
        """Shared (unmodulated) trunk features (N, F) from `features` output."""
        return F.relu(feats).mean((2, 3)) if feats.dim() == 4 else feats

    @staticmethod
    def _head(theta: dict[str, torch.Tensor], x: torch.Tensor, pairwise: bool) -> torch.Tensor:
        if pairwise:  # x: (P, Q, F) or (Q, F)
            eq = "phf,pqf->pqh" if x.dim() == 3 else "phf,qf->pqh"
            hidden = torch.einsum(eq, theta[W1], x) + theta[B1][:, None, :]
            return torch.einsum("pqh,ph->pq", F.relu(hidden), theta[W2][:, 0, :]) + theta[B2]
        hidden = torch.einsum("nhf,nf->nh", theta[W1], x) + theta[B1]
        return torch.einsum("nh,nh->n", F.relu(hidden), theta[W2][:, 0, :]) + theta[B2][:, 0]

    @staticmethod
    def score_matrix(theta: dict[str, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """logits[i, j] = f(probe j; theta_i) for all P users x Q probes -> (P, Q)."""
        if FILM_SCALE not in theta:
            return HyperNetwork._head(theta, feats, pairwise=True)
        rows = []
        for s in range(0, len(theta[W1]), _USER_CHUNK):
            part = {k: v[s:s + _USER_CHUNK] for k, v in theta.items()}
            scale, shift = part[FILM_SCALE][:, None, :, None, None], part[FILM_SHIFT][:, None, :, None, None]
            pooled = F.relu(scale * feats[None] + shift).mean((3, 4))  # (p, Q, F)
            rows.append(HyperNetwork._head(part, pooled, pairwise=True))
        return torch.cat(rows)

    @staticmethod
    def score_pairs(theta: dict[str, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """logits[i] = f(probe i; theta_i) for N aligned (user, probe) pairs -> (N,)."""
        if FILM_SCALE in theta:
            feats = F.relu(theta[FILM_SCALE][:, :, None, None] * feats + theta[FILM_SHIFT][:, :, None, None]).mean((2, 3))
        return HyperNetwork._head(theta, feats, pairwise=False)

    @staticmethod
    def theta_sq_norm(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """||theta_i||^2 of each user's generated weights -> (B,); the film scale counts as its
        distance from 1 (no modulation)."""
        return sum((t - 1.0 if k == FILM_SCALE else t).flatten(1).pow(2).sum(1) for k, t in theta.items())

    # -- hand-off -----------------------------------------------------------------------------
    def verifier_state_dict(self, theta_one: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full `verifier` state dict for one user: trunk + that user's tensors (film folded
        into the last conv, so the verifier is a plain conv net)."""
        state = {f"features.{k}": v.detach().clone() for k, v in self.trunk.state_dict().items()}
        for name, value in theta_one.items():
            if name not in (FILM_SCALE, FILM_SHIFT):
                state[name] = value.detach().clone()
        if self.film:
            w, b = f"features.{Verifier.LAST_CONV}.weight", f"features.{Verifier.LAST_CONV}.bias"
            scale, shift = theta_one[FILM_SCALE].detach(), theta_one[FILM_SHIFT].detach()
            state[w] = state[w] * scale[:, None, None, None]
            state[b] = state[b] * scale + shift
        return state

    def build_verifier(self, theta_one: dict[str, torch.Tensor]) -> Verifier:
        verifier = Verifier(**self.verifier_kwargs)
        verifier.load_state_dict(self.verifier_state_dict(theta_one))
        return verifier.eval()


# -- checkpoints ------------------------------------------------------------------------------
class HypernetBundle:
    """Everything enrollment needs, from one hypernet checkpoint: h_bb, h_gen and the threshold."""

    def __init__(self, hypernet: HyperNetwork, backbone: nn.Module, threshold: float, meta: dict,
                 sha256: str | None = None) -> None:
        self.hypernet, self.backbone, self.threshold, self.meta = hypernet, backbone, threshold, meta
        self.sha256 = sha256  # of the checkpoint file: names the fleet templates its users share
        self._embedder: nn.Module | None = None

    @property
    def embedder(self) -> nn.Module:
        """h_bb for enrollment: BatchNorm folded into the convolutions and channels-last weights
        (equal to h_bb within 1e-6, and 25-30% faster per image on a CPU). Built once; every
        enrollment path (enroll, fleet, serve) embeds through it, so their files agree byte
        for byte."""
        if self._embedder is None:
            import copy

            from torch.fx.experimental.optimization import fuse

            try:
                fused = fuse(copy.deepcopy(self.backbone))
            except Exception:  # not symbolically traceable: the plain eval model, still correct
                fused = copy.deepcopy(self.backbone)
            self._embedder = fused.eval().to(memory_format=torch.channels_last)
        return self._embedder

    @property
    def flip(self) -> bool:
        """Whether enrollment embeddings sum the image and its mirror (as during training)."""
        return bool(self.meta.get("embedding", {}).get("flip", True))


def load_hypernet(path) -> HypernetBundle:
    """Load a hypernet checkpoint written by `toolchain.train.train_hypernet` (weights_only)."""
    from toolchain.errors import ToolchainError
    from toolchain.models.io import load_state
    from toolchain.models.registry import build_model

    payload = load_state(path)
    if not isinstance(payload, dict) or payload.get("model") != "hypernet" or "backbone" not in payload:
        raise ToolchainError(f"{path}: not a hypernet checkpoint (train one with `toolchain train hypernet`)")
    if not payload.get("complete", False):
        raise ToolchainError(f"{path}: hypernet training did not finish (resume it first)")
    try:
        hypernet = HyperNetwork(**payload["model_kwargs"])
        hypernet.load_state_dict(payload["state_dict"])
        bb = payload["backbone"]
        backbone = build_model(bb["model"], **bb.get("model_kwargs", {}))
        backbone.load_state_dict(bb["state_dict"])
    except (RuntimeError, TypeError, KeyError) as exc:
        raise ToolchainError(f"{path}: weights do not fit: {str(exc).splitlines()[0]}") from exc
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "backbone")}
    meta["backbone"] = {k: v for k, v in bb.items() if k != "state_dict"}
    for p in list(hypernet.parameters()) + list(backbone.parameters()):
        p.requires_grad_(False)
    import hashlib

    with open(path, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return HypernetBundle(hypernet.eval(), backbone.eval(), float(payload["threshold"]), meta, sha256=sha256)
