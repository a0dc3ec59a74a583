"""Hypernetwork: scoring consistency, loss falls, resume, KCS hardness, schedule, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolchain.errors import ToolchainError
from toolchain.models.hypernet import HyperNetwork, load_hypernet
from toolchain.models.io import load_state
from toolchain.models.int8_grid import on_int8_grid
from toolchain.train import BackboneConfig, HypernetConfig, train_backbone, train_hypernet
from toolchain.train import hypernet as hypernet_mod
from toolchain.train.hypernet import best_threshold, split_identities
from toolchain.train.losses import weighted_bce
from toolchain.train.sampling import IdentityBatchSampler, identity_centres, mean_negative_cosine
from toolchain.train.schedule import objective_at

BB = dict(embedding_size=16, batch_size=12, optimizer="adamw", lr=0.01, arcface_scale=16.0, arcface_margin=0.2,
          warmup_steps=2, progress=False)
HN = dict(identities_per_batch=6, probes_per_identity=2, val_identities=0.25, progress=False, code_dim=16,
          encoder_hidden=32, kcs_recluster_every=20)


@pytest.fixture(scope="module")
def backbone_ckpt(tiny_model, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone")
    return train_backbone(BackboneConfig(model=tiny_model, epochs=6, **BB), toy_data, out)


def test_generated_verifier_matches_batched_scoring():
    hn = HyperNetwork(embedding_dim=16, code_dim=8, rank=4)
    with torch.no_grad():  # non-trivial generator weights
        for p in hn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    emb, x = torch.randn(3, 16), torch.randn(5, 3, 112, 112)
    with torch.no_grad():
        theta = hn(emb)
        matrix = HyperNetwork.score_matrix(theta, hn.features(x))
        for i in range(3):
            verifier = hn.build_verifier({k: v[i] for k, v in theta.items()})
            assert torch.allclose(verifier(x)[:, 0], matrix[i], atol=1e-5)
        pairs = HyperNetwork.score_pairs({k: v[:3] for k, v in theta.items()}, hn.features(x[:3]))
        assert torch.allclose(pairs, matrix.diagonal(), atol=1e-5)
    n_head = sum(v[0].numel() for v in theta.values())
    assert n_head == 64 * 96 + 64 + 64 + 1  # head: Linear(96, 64), Linear(64, 1)
    gen_params = sum(p.numel() for n, p in hn.named_parameters() if n.startswith("gen_"))
    assert gen_params < 16 * n_head  # far below a (embedding x theta) matrix


def test_hypernet_loss_falls_and_calibrates(backbone_ckpt, toy_data, tmp_path):
    cfg = HypernetConfig(steps=80, **HN)
    path = train_hypernet(cfg, backbone_ckpt, toy_data, tmp_path / "hn")
    state = load_state(path)
    bce = [h["bce"] for h in state["history"]]
    assert np.mean(bce[-10:]) < 0.7 * np.mean(bce[:10]), (np.mean(bce[:10]), np.mean(bce[-10:]))
    cal = state["calibration"]
    assert cal["balanced_accuracy"] > 0.7 and cal["identities"] == 3
    assert (tmp_path / "hn" / "embeddings.pt").is_file()  # the h_bb cache
    bundle = load_hypernet(path)  # the file alone holds h_bb, h_gen and the threshold
    assert bundle.threshold == cal["threshold"]
    # The shared trunk ends on the int8 weight grid (HypernetConfig.trunk_int8_grid).
    assert on_int8_grid(bundle.hypernet.trunk)
    # Held-out identities never appear in training batches (they calibrate the threshold).
    assert set(state["val_identities"]).isdisjoint(set(split_identities(toy_data.labels, 0.25, 0)[0].tolist()))


def test_hypernet_resume(backbone_ckpt, toy_data, tmp_path, monkeypatch):
    cfg = HypernetConfig(steps=24, checkpoint_every=8, **HN)
    ref = load_state(train_hypernet(cfg, backbone_ckpt, toy_data, tmp_path / "ref"))

    real, calls = hypernet_mod.objective_at, {"n": 0}

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(hypernet_mod, "objective_at", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_hypernet(cfg, backbone_ckpt, toy_data, tmp_path / "run")
    assert load_state(tmp_path / "run" / "last.pt")["step"] == 8
    monkeypatch.setattr(hypernet_mod, "objective_at", real)
    out = load_state(train_hypernet(cfg, backbone_ckpt, toy_data, tmp_path / "run"))
    assert len(out["history"]) == 24
    assert [h["loss"] for h in out["history"]] == pytest.approx([h["loss"] for h in ref["history"]], rel=1e-4)
    for k, v in ref["state_dict"].items():
        assert torch.allclose(out["state_dict"][k], v, atol=1e-5), k


def _family_embeddings(n_families=12, per_family=4, images=5, dim=32, seed=0):
    """Identity centres in look-alike families (as the synthetic faces have), images around them."""
    rng = np.random.default_rng(seed)
    fam = rng.normal(size=(n_families, dim))
    centres = np.repeat(fam, per_family, axis=0) + 0.5 * rng.normal(size=(n_families * per_family, dim))
    labels = np.repeat(np.arange(len(centres)), images)
    emb = centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    return torch.tensor(emb, dtype=torch.float32), labels


def test_kcs_batches_hold_harder_negatives():
    emb, labels = _family_embeddings()
    ids = np.unique(labels)
    sampler = IdentityBatchSampler(labels, ids, identity_centres(emb, labels, ids), identities_per_batch=4,
                                   probes_per_identity=2, seed=0, recluster_every=10)
    kcs, rnd = [], []
    for step in range(60):
        rng = np.random.default_rng(step)
        kcs.append(mean_negative_cosine(emb, sampler.sample(rng, step, use_kcs=True)))
        rnd.append(mean_negative_cosine(emb, sampler.sample(rng, step, use_kcs=False)))
    assert np.mean(kcs) > np.mean(rnd) + 0.2, (np.mean(kcs), np.mean(rnd))
    batch = sampler.sample(np.random.default_rng(0), 0, use_kcs=True)
    assert len(set(batch.identities.tolist())) == 4 and len(batch.probes) == 8
    assert all(labels[batch.enroll[o]] == labels[p] for p, o in zip(batch.probes, batch.probe_owner))
    assert not set(batch.enroll.tolist()) & set(batch.probes.tolist())  # probes differ from the enrollment image


def test_schedule_phases_and_switches():
    cfg = HypernetConfig(steps=100, norm_penalty=1e-3, kcs_fraction=0.8, schedule_warmup=0.3, schedule_ramp=0.3,
                         schedule_norm_start=0.1)
    start, mid, end = objective_at(cfg, 0), objective_at(cfg, 45), objective_at(cfg, 90)
    assert start.kcs_prob == 0 and start.norm_weight == pytest.approx(1e-4)
    assert 0 < mid.kcs_prob < 0.8 and 1e-4 < mid.norm_weight < 1e-3
    assert end.kcs_prob == pytest.approx(0.8) and end.norm_weight == pytest.approx(1e-3)
    flat = cfg.model_copy(update={"schedule": False})
    assert objective_at(flat, 0) == objective_at(flat, 99) == end
    off = cfg.model_copy(update={"kcs": False, "norm_penalty": 0.0})
    assert all(objective_at(off, s).kcs_prob == 0 and objective_at(off, s).norm_weight == 0 for s in (0, 50, 99))
    with pytest.raises(ValueError):
        HypernetConfig(schedule_warmup=0.8, schedule_ramp=0.5)
    with pytest.raises(ValueError):
        HypernetConfig(unknown_field=1)


def test_kcs_switch_changes_training_batches(backbone_ckpt, toy_data, tmp_path):
    on = load_state(train_hypernet(HypernetConfig(steps=10, schedule=False, kcs_fraction=1.0, **HN),
                                   backbone_ckpt, toy_data, tmp_path / "on"))
    off = load_state(train_hypernet(HypernetConfig(steps=10, kcs=False, **HN), backbone_ckpt, toy_data, tmp_path / "off"))
    assert all(h["kcs"] for h in on["history"]) and not any(h["kcs"] for h in off["history"])


def test_weighted_bce_and_threshold():
    logits = torch.tensor([[2.0, -1.0, -3.0], [0.5, 1.0, -2.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0]]).bool()
    balanced = weighted_bce(logits, targets)  # pos_weight = 4/2 = 2
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    w = torch.where(targets, 2.0, 1.0)
    assert balanced == pytest.approx(float((manual * w).sum() / w.sum()))
    assert weighted_bce(logits, targets, pos_weight=1.0) == pytest.approx(float(manual.mean()))

    thr, acc = best_threshold(np.array([3.0, 2.0, 1.0, 0.0, -1.0]), np.array([1, 1, 0, 1, 0], bool))
    assert acc == pytest.approx(0.5 * (2 / 3 + 1)) or acc == pytest.approx(0.5 * (1 + 0.5))
    assert (np.array([3.0, 2.0, 1.0, 0.0, -1.0]) >= thr).sum() in (2, 4)
    with pytest.raises(ToolchainError):
        best_threshold(np.array([1.0, 2.0]), np.array([True, True]))
    # Weights move the threshold: a heavy negative at 2.0 pushes it above 2, at 0.0 below 1.
    scores, same = np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, False, True, False])
    assert best_threshold(scores, same, np.array([1, 3, 1, 1.0]))[0] == pytest.approx(2.5)
    thr, acc = best_threshold(scores, same, np.array([1, 1, 1, 3.0]))
    assert thr == pytest.approx(0.5) and acc == pytest.approx(0.875)


def test_too_few_identities(backbone_ckpt, make_toy, tmp_path):
    with pytest.raises(ToolchainError, match="identities"):
        train_hypernet(HypernetConfig(steps=2, **HN), backbone_ckpt, make_toy(num_classes=4), tmp_path / "x")


def test_redesign_switches_train_and_calibrate(backbone_ckpt, toy_data, tmp_path):
    """film + cohort normalisation + trunk pretraining + score distillation + bf16 autocast (CPU),
    all at once: the
    trained cohort standardises held-out users' scores and the pretraining moved the trunk."""
    cfg = HypernetConfig(steps=30, verifier_kwargs={"film": True}, cohort_size=8, cohort_refresh=10,
                         trunk_pretrain_steps=6, trunk_pretrain_batch=16, amp="bf16", score_distill=0.5, **HN)
    path = train_hypernet(cfg, backbone_ckpt, toy_data, tmp_path / "hn")
    bundle = load_hypernet(path)
    hn = bundle.hypernet
    assert hn.film and hn.cohort_size == 8 and bool(hn.cohort_ready)
    with torch.no_grad():
        theta = hn(torch.randn(3, 16))
        cohort_scores = hn.score_matrix(theta, hn.cohort)
    assert torch.allclose(cohort_scores.mean(1), torch.full((3,), float(hn.cohort_offset)), atol=1e-3)
    assert np.isfinite(load_state(path)["calibration"]["threshold"])


def test_trunk_pretraining_lowers_the_distillation_loss(backbone_ckpt, toy_data, tmp_path, monkeypatch):
    losses = []
    real = hypernet_mod.progress_bar

    def spy(name, total, **kw):
        ctx = real(name, total, **{**kw, "enabled": False})

        class _Wrap:
            def __enter__(self):
                advance = ctx.__enter__()

                def record(n=1, **fields):
                    if "distill" in fields:
                        losses.append(fields["distill"])
                    return advance(n, **fields)
                return record

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)
        return _Wrap()

    monkeypatch.setattr(hypernet_mod, "progress_bar", spy)
    cfg = HypernetConfig(steps=2, trunk_pretrain_steps=40, trunk_pretrain_batch=24, **HN)
    train_hypernet(cfg, backbone_ckpt, toy_data, tmp_path / "hn")
    assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5])
