"""h_gen: the hypernetwork that writes a user's verifier f(x; theta) from a face embedding.

Design (SPEC section 1 leaves it to the project):
- The verifier's `features` trunk is h_gen's learned shared base: every user gets the same trunk
  weights. Only the `head` (Linear(F,H), ReLU, Linear(H,1); about 8.3k weights for F=128, H=64)
  is generated per user.
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


class HyperNetwork(nn.Module):
    def __init__(self, embedding_dim: int, code_dim: int = 64, encoder_hidden: int = 256, rank: int = 8,
                 verifier_kwargs: dict | None = None) -> None:
        super().__init__()
        self.verifier_kwargs = dict(verifier_kwargs or {})
        base = Verifier(**self.verifier_kwargs)
        self.trunk = base.features  # shared base of every user's verifier
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
        for layer in (self.gen_b1, self.gen_w2, self.gen_b2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- generation -------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batched head weights theta_i for B embeddings: {name: (B, *shape)}."""
        z = self.encoder(F.normalize(embeddings, dim=1))
        n, h, f = z.shape[0], self.hidden_dim, self.feature_dim
        if self.rank > 0:
            u = self.gen_u(z).view(n, h, self.rank)
            v = self.gen_v(z).view(n, f, self.rank)
            dw1 = torch.bmm(u, v.transpose(1, 2)) / math.sqrt(self.rank)
        else:
            dw1 = self.gen_w1(z).view(n, h, f)
        return {
            W1: self.base_w1 + dw1,
            B1: self.base_b1 + self.gen_b1(z),
            W2: self.base_w2 + self.gen_w2(z).view(n, 1, h),
            B2: self.base_b2 + self.gen_b2(z),
        }

    # -- scoring with generated heads ---------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Trunk features g(x) of normalised images (N, 3, 112, 112) -> (N, F)."""
        return self.trunk(images)

    @staticmethod
    def score_matrix(theta: dict[str, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """logits[i, j] = head(feats[j]; theta_i) for all P users x Q probes -> (P, Q)."""
        hidden = torch.einsum("phf,qf->pqh", theta[W1], feats) + theta[B1][:, None, :]
        return torch.einsum("pqh,ph->pq", F.relu(hidden), theta[W2][:, 0, :]) + theta[B2]

    @staticmethod
    def score_pairs(theta: dict[str, torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """logits[i] = head(feats[i]; theta_i) for N aligned (user, probe) pairs -> (N,)."""
        hidden = torch.einsum("nhf,nf->nh", theta[W1], feats) + theta[B1]
        return torch.einsum("nh,nh->n", F.relu(hidden), theta[W2][:, 0, :]) + theta[B2][:, 0]

    @staticmethod
    def theta_sq_norm(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        """||theta_i||^2 of each generated head -> (B,)."""
        return sum(t.flatten(1).pow(2).sum(1) for t in theta.values())

    # -- hand-off -----------------------------------------------------------------------------
    def verifier_state_dict(self, theta_one: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full `verifier` state dict for one user: shared trunk + that user's head."""
        state = {f"features.{k}": v.detach().clone() for k, v in self.trunk.state_dict().items()}
        for name, value in theta_one.items():
            state[name] = value.detach().clone()
        return state

    def build_verifier(self, theta_one: dict[str, torch.Tensor]) -> Verifier:
        verifier = Verifier(**self.verifier_kwargs)
        verifier.load_state_dict(self.verifier_state_dict(theta_one))
        return verifier.eval()


# -- checkpoints ------------------------------------------------------------------------------
class HypernetBundle:
    """Everything enrollment needs, from one hypernet checkpoint: h_bb, h_gen and the threshold."""

    def __init__(self, hypernet: HyperNetwork, backbone: nn.Module, threshold: float, meta: dict) -> None:
        self.hypernet, self.backbone, self.threshold, self.meta = hypernet, backbone, threshold, meta

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
    return HypernetBundle(hypernet.eval(), backbone.eval(), float(payload["threshold"]), meta)
