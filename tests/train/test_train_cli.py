"""`toolchain train backbone|hypernet` and `toolchain evaluate ablation` on a tiny synthetic folder."""

from __future__ import annotations

import json

import pytest

from toolchain.cli import main
from toolchain.models.io import load_state


@pytest.fixture(scope="module")
def synth_folder(tmp_path_factory):
    from toolchain.data.writers import write_synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic(root, identities=12, images_per_identity=4, val_identities=8, pairs=40)
    return root


@pytest.mark.slow
def test_cli_train_and_ablation(tiny_model, synth_folder, tmp_path):
    fast = ["--set", "embedding_size=16", "--set", "batch_size=12", "--set", "optimizer=adamw", "--set", "lr=0.01",
            "--set", "progress=false"]
    rc = main(["train", "backbone", "--data", str(synth_folder / "train"), "--model", tiny_model, "--epochs", "1",
               "--out", str(tmp_path / "bb"), *fast])
    assert rc == 0
    bb = tmp_path / "bb" / "backbone.pt"
    assert load_state(bb)["config"]["model"] == tiny_model

    hn_set = ["--set", "identities_per_batch=4", "--set", "code_dim=8", "--set", "encoder_hidden=16",
              "--set", "val_identities=0.25", "--set", "progress=false"]
    rc = main(["train", "hypernet", "--backbone", str(bb), "--data", str(synth_folder / "train"), "--steps", "6",
               "--out", str(tmp_path / "hn"), *hn_set])
    assert rc == 0 and (tmp_path / "hn" / "hypernet.pt").is_file()

    rc = main(["evaluate", "ablation", "--backbone", str(bb), "--data", str(synth_folder / "train"),
               "--pairs", str(synth_folder), "--steps", "6", "--out", str(tmp_path / "abl"), *hn_set])
    assert rc == 0
    rows = json.loads((tmp_path / "abl" / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["full", "no-kcs", "no-norm-penalty", "no-schedule"]
    assert [(r["kcs"], r["norm_penalty"] > 0, r["schedule"]) for r in rows] == [
        (True, True, True), (False, True, True), (True, False, True), (True, True, False)]
    assert all(0 <= r["per_user_accuracy"] <= 1 for r in rows)
    assert len({r["backbone_accuracy"] for r in rows}) == 1  # same backbone, same pairs


def test_cli_bad_config(tmp_path):
    assert main(["train", "hypernet", "--backbone", str(tmp_path / "none.pt"), "--set", "kcs_fraction=2"]) == 2
    assert main(["train", "backbone", "--set", "nonsense=1", "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "backbone", "--set", "novalue", "--out", str(tmp_path / "x")]) == 2


def test_bad_configs_are_one_line_errors(tmp_path):
    """These were internal errors (exit 3): a --set that makes a value a section, a config file
    of random bytes, and a model that takes no embedding size."""
    from toolchain.cli.train import _config
    from toolchain.errors import ToolchainError
    from toolchain.models import build_model
    from toolchain.train import BackboneConfig

    with pytest.raises(ToolchainError, match="epochs is a value, not a section"):
        _config(BackboneConfig, None, ("epochs=1", "epochs.x=1"))
    (tmp_path / "random.yaml").write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ToolchainError, match="cannot read config"):
        _config(BackboneConfig, str(tmp_path / "random.yaml"), ())
    with pytest.raises(ToolchainError, match="'verifier'"):
        build_model("verifier", embedding_size=128)


def test_enroll_refuses_an_empty_user_name(tmp_path, capsys):
    (tmp_path / "h.pt").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    rc = main(["enroll", "--hypernet", str(tmp_path / "h.pt"), "--image", str(tmp_path / "a.png"), "--user", " ",
               "--out", str(tmp_path / "u")])
    assert rc == 2 and "--user: an empty name" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_generations_below_one_name_the_option(tmp_path, capsys):
    """`--generations -2` was reported as `distill.teacher: Field required`."""
    rc = main(["train", "backbone", "--data", str(tmp_path), "--generations", "-2", "--out", str(tmp_path / "b")])
    assert rc == 2 and "--generations" in capsys.readouterr().err


def test_an_unknown_ablation_variant_fails_before_the_work(tmp_path, capsys):
    """It failed after 13-16 s of loading data and training a backbone."""
    rc = main(["evaluate", "ablation", "--data", str(tmp_path), "--variants", "bogus", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "--variants: unknown bogus" in err
    assert not (tmp_path / "a").exists()
