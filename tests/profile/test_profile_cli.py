"""`toolchain profile`: JSON keys, the flops convention, handlers, unsupported ops, files."""

import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.cli import main
from toolchain.profile import layer_breakdown, profile_file, profile_model


class EveryHandledOp(nn.Module):
    """One of each op the zoo uses, on a 2x8x8 input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # 4*8*8 outputs x 2*9 = 4608
        self.bn = nn.BatchNorm2d(4)  # 256 elementwise
        self.prelu = nn.PReLU(4)  # 256
        self.silu = nn.SiLU()  # 256
        self.hswish = nn.Hardswish()  # 256
        self.maxpool = nn.MaxPool2d(2)  # 4*4*4 outputs x 4 = 256 macs
        self.avgpool = nn.AvgPool2d(2)  # 4*2*2 x 4 = 64 macs
        self.gap = nn.AdaptiveAvgPool2d(1)  # 4x4x4 inputs -> 64 macs
        self.fc = nn.Linear(4, 4)  # 16 macs
        self.sigmoid = nn.Sigmoid()  # 4
        self.relu = nn.ReLU()  # 16

    def forward(self, x):
        y = self.hswish(self.silu(self.prelu(self.bn(self.conv(x)))))
        y = self.maxpool(y)  # 4x4x4
        gate = self.sigmoid(self.fc(self.gap(y).flatten(1)))
        y = y * gate[:, :, None, None]  # 64 (the SE multiply)
        y = self.relu(y + y)  # add 64, relu 64
        return self.avgpool(y)


def test_every_handled_op_is_counted_exactly():
    p = profile_model(EveryHandledOp(), input_size=(2, 8, 8))
    assert p["unsupported_ops"] == {}
    assert p["macs_by_op"] == {"conv": 4608, "max_pool2d": 256, "adaptive_avg_pool2d": 64,
                               "linear": 16, "avg_pool2d": 64}
    assert p["macs"] == 4608 + 256 + 64 + 16 + 64
    assert p["elementwise_by_op"] == {"batch_norm": 256, "prelu": 256, "silu": 256,
                                      "hardswish": 256, "sigmoid": 4, "mul": 64, "add": 64,
                                      "relu": 64}
    assert p["flops"] == 2 * p["macs"]
    assert p["params"] == 2 * 4 * 9 + 8 + 4 + 20


class Unhandled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return torch.cumsum(self.conv(x), dim=-1)


def test_op_without_handler_is_listed_not_dropped():
    p = profile_model(Unhandled(), input_size=(1, 4, 4))
    assert p["unsupported_ops"] == {"aten::cumsum": 1}
    assert p["macs"] == 16  # the conv is still counted
    rows = layer_breakdown(Unhandled(), input_size=(1, 4, 4))
    assert rows[0]["module"] == "" and rows[0]["unsupported_ops"] == {"aten::cumsum": 1}


def test_profile_json_has_the_keys(capsys):
    assert main(["profile", "verifier", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    for key in ("model", "input_shape", "params", "macs", "flops", "unsupported_ops", "convention"):
        assert key in p
    assert p["model"] == "verifier" and p["input_shape"] == [1, 3, 112, 112]
    assert p["flops"] == 2 * p["macs"]
    assert p["unsupported_ops"] == {}
    assert "2 x macs" in p["convention"]["flops"]


def test_profile_input_size(capsys):
    assert main(["profile", "verifier", "--json", "--input-size", "64"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert small["input_shape"] == [1, 3, 64, 64]
    assert small["macs"] < profile_model("verifier")["macs"]


def test_profile_markdown_has_per_layer_rows(capsys):
    assert main(["profile", "verifier", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "### Per layer" in out and "`features.0` | Conv2d" in out and "| `head` |" in out


def test_profile_all(monkeypatch, capsys):
    import toolchain.models

    monkeypatch.setattr(toolchain.models, "list_models", lambda: ["verifier"])
    assert main(["profile", "--all", "--json"]) == 0
    profiles = json.loads(capsys.readouterr().out)
    assert [p["model"] for p in profiles] == ["verifier"]
    assert profiles[0]["params"] == 17073
    assert main(["profile", "--all", "--markdown"]) == 0
    assert "| verifier | 3x112x112 | 17,073 |" in capsys.readouterr().out


def test_profile_file(tmp_path, capsys):
    f = tmp_path / "model.tflite"
    data = b"\x1c\x00\x00\x00TFL3" * 50  # a TFLite file identifier at bytes 4-8
    f.write_bytes(data)
    info = profile_file(f)
    assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert main(["profile", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == len(data)


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["profile", "no-such-model"], "no-such-model"),
        (["profile", "missing.pte"], "missing.pte"),
        (["profile", "mobilefacenet", "--input-size", "32"], "mobilefacenet"),
        (["profile", "verifier", "--json", "--markdown"], "--markdown"),
        (["profile"], "--all"),
    ],
)
def test_profile_bad_input_exits_two(capsys, args, culprit):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["random.pte", "random.tflite", "empty.pte"])
def test_profile_of_a_file_that_is_not_its_format_exits_two(tmp_path, capsys, name):
    """Its size and digest would read as an artifact's, and a budget on its bytes would pass."""
    f = tmp_path / name
    f.write_bytes(b"" if name.startswith("empty") else np.random.default_rng(0).bytes(4096))
    assert main(["profile", str(f)]) == 2
    err = capsys.readouterr().err
    assert "file identifier is missing" in err and name in err
