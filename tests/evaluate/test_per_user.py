"""Per-user scoring against backbone cosine on the same pairs; the `evaluate pairs` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.cli import main
from toolchain.data.pairs import VerificationPairs
from toolchain.evaluate.per_user import ROUTES, backbone_embeddings, dedup_images, evaluate_pairs, to_jsonable
from toolchain.models import registry
from toolchain.models.hypernet import HypernetBundle, HyperNetwork
from toolchain.models.io import save_checkpoint
from toolchain.models.inputs import embed, nhwc_uint8_to_input

NAME = "tiny-per-user-test-embedder"


class _Embedder(nn.Module):
    def __init__(self, embedding_size: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(1), nn.Linear(8, embedding_size))

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def tiny_embedder():
    registry.register_model(NAME, output="embedding", output_dim=8)(lambda embedding_size=8: _Embedder(embedding_size))
    yield NAME
    registry._REGISTRY.pop(NAME, None)


def _pairs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)
    b = a.copy()
    same = np.arange(n) % 2 == 0
    b[~same] = rng.integers(0, 256, size=(int((~same).sum()), 112, 112, 3), dtype=np.uint8)
    b[same] = np.clip(b[same].astype(int) + rng.integers(-20, 20, size=b[same].shape), 0, 255).astype(np.uint8)
    return VerificationPairs(a, b, same, name="toy")


def _bundle(embedding_size=8):
    torch.manual_seed(0)
    hn = HyperNetwork(embedding_size, code_dim=8, encoder_hidden=16, rank=2)
    with torch.no_grad():
        for p in hn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return HypernetBundle(hn.eval(), _Embedder(embedding_size).eval(), threshold=0.0, meta={"embedding": {"flip": True}})


def test_scores_are_the_routes_they_claim():
    bundle, pairs = _bundle(), _pairs()
    res = evaluate_pairs(bundle, pairs, progress=False, batch_size=16)
    for route in ROUTES:
        assert 0.0 <= res[route]["accuracy"] <= 1.0 and "auc" in res[route] and "tar_at_far" in res[route]
    s = res["scores"]
    xa, xb = nhwc_uint8_to_input(pairs.images_a[:3]), nhwc_uint8_to_input(pairs.images_b[:3])
    with torch.no_grad():
        ea, eb = embed(bundle.backbone, xa), embed(bundle.backbone, xb)
        ta, tb = bundle.hypernet(ea), bundle.hypernet(eb)
        for k in range(3):
            f_a = bundle.hypernet.build_verifier({n: v[k] for n, v in ta.items()})
            f_b = bundle.hypernet.build_verifier({n: v[k] for n, v in tb.items()})
            ab, ba = float(f_a(xb[k:k + 1])), float(f_b(xa[k:k + 1]))
            assert s["per_user"][k] == pytest.approx(ab, abs=1e-5)  # f(b; theta_a)
            assert s["symmetric"][k] == pytest.approx(0.5 * (ab + ba), abs=1e-5)
            assert s["backbone_cosine"][k] == pytest.approx(float(ea[k] @ eb[k]), abs=1e-5)
    t = res["per_user_at_threshold"]
    assert t["accuracy"] == pytest.approx(float(((s["per_user"] >= 0.0) == pairs.issame).mean()))
    # Precomputed backbone embeddings (shared by the ablation's variants) give the same scores.
    again = evaluate_pairs(bundle, pairs, progress=False, embeddings=backbone_embeddings(bundle, pairs))
    for route in ROUTES:
        assert np.allclose(again["scores"][route], s[route], atol=1e-6)
    js = json.loads(json.dumps(to_jsonable(res, with_scores=True)))
    assert len(js["scores"]["per_user"]) == 40 and "scores" not in to_jsonable(res)


def test_repeated_images_are_embedded_once():
    pairs = _pairs(10)
    a = np.concatenate([pairs.images_a, pairs.images_a[:4]])
    b = np.concatenate([pairs.images_b, pairs.images_a[5:9]])
    unique, ia, ib = dedup_images(a, b)
    assert len(unique) == 20 and (unique[ia] == a).all() and (unique[ib] == b).all()
    bundle = _bundle()
    s = evaluate_pairs(bundle, VerificationPairs(a, b, np.arange(14) % 2 == 0), progress=False)["scores"]
    ref = evaluate_pairs(bundle, pairs, progress=False)["scores"]
    for route in ROUTES:
        assert np.allclose(s[route][:10], ref[route], atol=1e-6)
    with torch.no_grad():  # the extra pairs (a_k, a_{5+k}), computed directly
        xa, xb = nhwc_uint8_to_input(a[10:]), nhwc_uint8_to_input(b[10:])
        ea, eb = embed(bundle.backbone, xa), embed(bundle.backbone, xb)
        direct = bundle.hypernet.score_pairs(bundle.hypernet(ea), bundle.hypernet.features(xb)).numpy()
    assert np.allclose(s["backbone_cosine"][10:], (ea * eb).sum(1).numpy(), atol=1e-5)
    assert np.allclose(s["per_user"][10:], direct, atol=1e-5)


def test_evaluate_pairs_cli(tiny_embedder, tmp_path):
    from toolchain.data.insightface_bin import write_bin
    from toolchain.data.codec import encode_jpeg

    bundle = _bundle()
    backbone = {"model": NAME, "model_kwargs": {"embedding_size": 8}, "state_dict": bundle.backbone.state_dict()}
    kwargs = {"embedding_dim": 8, "code_dim": 8, "encoder_hidden": 16, "rank": 2, "verifier_kwargs": {}}
    ckpt = tmp_path / "hypernet.pt"
    save_checkpoint(ckpt, "hypernet", kwargs, bundle.hypernet.state_dict(), backbone=backbone, threshold=0.5,
                    complete=True, embedding={"flip": True})
    pairs = _pairs()
    jpegs = [encode_jpeg(img) for ab in zip(pairs.images_a, pairs.images_b) for img in ab]
    write_bin(tmp_path / "toy.bin", jpegs, pairs.issame)
    rc = main(["evaluate", "pairs", "--hypernet", str(ckpt), "--pairs", str(tmp_path / "toy.bin"),
               "--json", str(tmp_path / "m.json")])
    assert rc == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert set(ROUTES) <= set(out) and out["num_pairs"] == 40
    assert out["per_user_at_threshold"]["threshold"] == 0.5
    assert main(["evaluate", "pairs", "--hypernet", str(tmp_path / "toy.bin"), "--pairs", str(tmp_path / "toy.bin")]) == 2
