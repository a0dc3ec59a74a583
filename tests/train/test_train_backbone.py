"""Backbone training: loss falls, exact resume, distillation generations, DDP on 2 CPU processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from toolchain.errors import ToolchainError
from toolchain.models.io import load_model, load_state
from toolchain.train import BackboneConfig, train_backbone
from toolchain.train import backbone as backbone_mod

FAST = dict(embedding_size=16, batch_size=12, optimizer="adamw", lr=0.01, arcface_scale=16.0,
            arcface_margin=0.2, warmup_steps=2, progress=False)


def test_loss_falls(tiny_model, toy_data, tmp_path):
    cfg = BackboneConfig(model=tiny_model, epochs=8, **FAST)
    path = train_backbone(cfg, toy_data, tmp_path)
    state = load_state(path)
    hist = state["history"]
    assert len(hist) == 8 * (len(toy_data) // 12) == state["step"]
    first, last = sum(hist[:4]) / 4, sum(hist[-4:]) / 4
    assert last < 0.6 * first, (first, last)
    model, meta = load_model(path)  # the final checkpoint is a plain zoo checkpoint
    assert meta["model"] == tiny_model and meta["complete"] is True
    assert model(torch.zeros(2, 3, 112, 112)).shape == (2, 16)


def test_resume_matches_uninterrupted(tiny_model, toy_data, tmp_path, monkeypatch):
    cfg = BackboneConfig(model=tiny_model, epochs=3, checkpoint_every=4, **FAST)
    ref = load_state(train_backbone(cfg, toy_data, tmp_path / "ref"))

    real_step, calls = backbone_mod._step, {"n": 0}

    def crashing_step(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 11:  # dies during step 11; the last checkpoint is at step 8
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(backbone_mod, "_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(cfg, toy_data, tmp_path / "run")
    assert load_state(tmp_path / "run" / "last.pt")["step"] == 8
    assert not (tmp_path / "run" / "backbone.pt").exists()

    monkeypatch.setattr(backbone_mod, "_step", real_step)
    resumed_steps = {"n": 0}

    def counting_step(*args, **kw):
        resumed_steps["n"] += 1
        return real_step(*args, **kw)

    monkeypatch.setattr(backbone_mod, "_step", counting_step)
    out = load_state(train_backbone(cfg, toy_data, tmp_path / "run"))
    assert resumed_steps["n"] == ref["step"] - 8  # continued from step 8, did not restart
    assert out["step"] == ref["step"]
    assert out["history"] == pytest.approx(ref["history"], rel=1e-5, abs=1e-6)
    for k, v in ref["state_dict"].items():
        assert torch.allclose(out["state_dict"][k].float(), v.float(), atol=1e-5), k

    # A finished run is not trained again; another config in the same folder is refused.
    assert train_backbone(cfg, toy_data, tmp_path / "run") == tmp_path / "run" / "backbone.pt"
    (tmp_path / "run" / "backbone.pt").unlink()
    with pytest.raises(ToolchainError, match="another config"):
        train_backbone(cfg.model_copy(update={"lr": 0.5}), toy_data, tmp_path / "run")


def test_recursive_distillation(tiny_model, toy_data, tmp_path):
    teacher_path = train_backbone(BackboneConfig(model=tiny_model, epochs=4, **FAST), toy_data, tmp_path / "teacher")
    cfg = BackboneConfig(model=tiny_model, epochs=2, seed=1, distill={"teacher": str(teacher_path), "generations": 2},
                         **FAST)
    path = train_backbone(cfg, toy_data, tmp_path / "student")
    assert path == tmp_path / "student" / "backbone.pt"
    assert (tmp_path / "student" / "gen1" / "backbone.pt").is_file()
    assert load_state(path)["generation"] == 2

    teacher, _ = load_model(teacher_path)
    student, _ = load_model(path)
    untrained = backbone_mod.build_model(tiny_model, embedding_size=16).eval()
    x = toy_data.images[:24]
    with torch.no_grad():
        t = teacher(x)
        cos_student = torch.nn.functional.cosine_similarity(student(x), t).mean()
        cos_random = torch.nn.functional.cosine_similarity(untrained(x), t).mean()
    assert cos_student > cos_random + 0.2, (float(cos_student), float(cos_random))


def test_teacher_size_mismatch(tiny_model, toy_data, tmp_path):
    teacher = train_backbone(BackboneConfig(model=tiny_model, max_steps=1, **FAST), toy_data, tmp_path / "t")
    cfg = BackboneConfig(model=tiny_model, max_steps=1, distill={"teacher": str(teacher)},
                         **(FAST | {"embedding_size": 8}))
    with pytest.raises(ToolchainError, match="embedding size"):
        train_backbone(cfg, toy_data, tmp_path / "s")


_DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import TINY, TinyEmbedder, ToyIdentities
    from toolchain.models import registry
    registry.register_model(TINY, output="embedding", output_dim=16)(lambda embedding_size=16: TinyEmbedder(embedding_size))
    from toolchain.train import BackboneConfig, train_backbone
    import torch.distributed as dist
    cfg = BackboneConfig(model=TINY, max_steps=4, checkpoint_every=2, embedding_size=16, batch_size=12,
                         optimizer="adamw", lr=0.01, arcface_scale=16.0, arcface_margin=0.2, progress=False)
    path = train_backbone(cfg, ToyIdentities(), {out!r})
    # Every rank ends with the same weights (DDP keeps them in sync) and saw a 6-image batch.
    state = torch.load(path, weights_only=True)
    w = state["state_dict"]["net.1.weight"]
    with open(os.path.join({out!r}, "rank%s.txt" % os.environ["RANK"]), "w") as f:
        f.write("%d %.8f" % (state["step"], float(w.sum())))
    # The hypernetwork trainer under the same launcher (each rank draws its own batches).
    from toolchain.train import HypernetConfig, train_hypernet
    hcfg = HypernetConfig(steps=4, checkpoint_every=2, identities_per_batch=4, code_dim=8, encoder_hidden=16,
                          val_identities=0.25, progress=False)
    train_hypernet(hcfg, path, ToyIdentities(), os.path.join({out!r}, "hn"))
""")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "out")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # A session of its own, so a timeout kills torchrun's workers too instead of orphaning them.
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    r0 = (tmp_path / "out" / "rank0.txt").read_text().split()
    r1 = (tmp_path / "out" / "rank1.txt").read_text().split()
    assert r0[0] == r1[0] == "4"
    assert r0[1] == r1[1]
    assert load_state(tmp_path / "out" / "backbone.pt")["step"] == 4
    assert len(load_state(tmp_path / "out" / "hn" / "hypernet.pt")["history"]) == 4


def test_bf16_autocast_trains(tiny_model, toy_data, tmp_path):
    """`amp: bf16` runs the step under autocast (CPU here, the CUDA path's code) and still learns."""
    cfg = BackboneConfig(model=tiny_model, epochs=8, amp="bf16", **FAST)
    hist = load_state(train_backbone(cfg, toy_data, tmp_path / "bb"))["history"]
    assert all(torch.isfinite(torch.tensor(hist))) and sum(hist[-4:]) / 4 < 0.8 * sum(hist[:4]) / 4


def test_init_with_zero_steps_is_the_checkpoint(tiny_model, toy_data, tmp_path):
    trained = train_backbone(BackboneConfig(model=tiny_model, epochs=2, **FAST), toy_data, tmp_path / "a")
    cfg = BackboneConfig(model=tiny_model, max_steps=0, init=str(trained), **FAST)
    copied = load_state(train_backbone(cfg, toy_data, tmp_path / "b"))
    source = load_state(trained)
    assert copied["history"] == [] and copied["step"] == 0
    for name, value in source["state_dict"].items():
        assert torch.equal(copied["state_dict"][name], value), name
    # init is a start: more steps move the weights away from it
    tuned = load_state(train_backbone(BackboneConfig(model=tiny_model, max_steps=3, init=str(trained), **FAST),
                                      toy_data, tmp_path / "c"))
    assert tuned["step"] == 3
    assert not all(torch.equal(tuned["state_dict"][k], v) for k, v in source["state_dict"].items())


def test_init_errors_are_one_line(tiny_model, toy_data, tmp_path):
    with pytest.raises(ValueError, match="max_steps 0 trains nothing"):
        BackboneConfig(model=tiny_model, max_steps=0, **FAST)
    with pytest.raises(ToolchainError, match="no such checkpoint"):
        train_backbone(BackboneConfig(model=tiny_model, max_steps=0, init=str(tmp_path / "none.pt"), **FAST),
                       toy_data, tmp_path / "x")
    trained = train_backbone(BackboneConfig(model=tiny_model, epochs=1, **FAST), toy_data, tmp_path / "a")
    wider = BackboneConfig(model=tiny_model, max_steps=0, init=str(trained), **{**FAST, "embedding_size": 8})
    with pytest.raises(ToolchainError, match="do not fit"):
        train_backbone(wider, toy_data, tmp_path / "y")


def test_max_seconds_stops_and_anneals(tiny_model, toy_data, tmp_path, monkeypatch):
    # A fake clock that advances 1 s per reading: the 6 s budget ends the run long before 1,000 steps.
    ticks = iter(range(10_000))
    monkeypatch.setattr(backbone_mod.time, "monotonic", lambda: float(next(ticks)))
    cfg = BackboneConfig(model=tiny_model, max_steps=1000, max_seconds=6, **FAST)
    lrs = []
    real_follow = backbone_mod._Budget.follow

    def recording_follow(self, optimizer, step, env):
        done = real_follow(self, optimizer, step, env)
        lrs.append(optimizer.param_groups[0]["lr"])
        return done

    monkeypatch.setattr(backbone_mod._Budget, "follow", recording_follow)
    state = load_state(train_backbone(cfg, toy_data, tmp_path))
    assert 1 <= state["step"] < 10 and state["complete"] is True
    assert len(state["history"]) == state["step"]
    assert lrs[-1] < 0.05 * FAST["lr"]  # the schedule followed the clock to its end, not the 1,000 steps
