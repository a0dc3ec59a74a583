"""Float-model hand-off: checkpoints and enrolled user folders round-trip; bad files exit 2."""

import pytest
import torch

from toolchain.errors import ToolchainError
from toolchain.models import build_model
from toolchain.models.io import load_model, save_checkpoint, save_enrollment


def test_enrollment_round_trip(tmp_path):
    model = build_model("verifier")
    save_enrollment(tmp_path / "alice", model, {}, threshold=0.25, user="alice")
    loaded, meta = load_model(tmp_path / "alice")
    assert meta["threshold"] == 0.25 and meta["user"] == "alice"
    x = torch.randn(2, 3, 112, 112)
    assert torch.equal(loaded(x), model.eval()(x))
    # The weights file is a plain state dict of the verifier, loadable without the toolchain.
    state = torch.load(tmp_path / "alice" / "verifier.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert not list(tmp_path.glob("alice/*.tmp"))


def test_checkpoint_round_trip(tmp_path):
    model = build_model("verifier", width=8)
    save_checkpoint(tmp_path / "c.pt", "verifier", {"width": 8}, model.state_dict(), epoch=2)
    loaded, meta = load_model(tmp_path / "c.pt")
    assert meta["epoch"] == 2 and meta["model_kwargs"] == {"width": 8}


def test_bad_files_raise_one_line_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ToolchainError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ToolchainError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ToolchainError, match="enrollment.json"):
        load_model(tmp_path)
    torch.save({"model": "verifier", "state_dict": {"bogus": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ToolchainError, match="do not fit"):
        load_model(tmp_path / "wrong.pt")


def test_verifier_shape_and_ops():
    model = build_model("verifier").eval()
    assert model.spec.output == "logit" and model.spec.input_size == (3, 112, 112)
    assert model(torch.zeros(3, 3, 112, 112)).shape == (3, 1)
    # int8-first: no BatchNorm, PReLU or normalisation layers inside f.
    kinds = {type(m).__name__ for m in model.modules()}
    assert kinds.isdisjoint({"BatchNorm2d", "PReLU", "LayerNorm"})
