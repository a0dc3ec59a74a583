"""The zoo backbones build, state their spec, and run a forward pass (batch 2, eval mode)."""

import pytest
import torch

from toolchain.models import build_model, get_spec, list_models
from toolchain.models.seesawfacenet import ChannelShuffle, SeesawBlock

ZOO = [
    "mobilefacenet",
    "seesawfacenet",
    "seesawfacenet-share",
    "dw-seesawfacenet-v1",
    "dw-seesawfacenet-v2",
    "vargfacenet",
]


def test_zoo_is_registered():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
def test_spec(name):
    spec = get_spec(name)
    assert spec.input_size == (3, 112, 112)
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert (spec.output, spec.output_dim) == ("embedding", 512)


@pytest.mark.parametrize("name", ZOO)
def test_forward_batch_of_two(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert model.spec.name == name
    x = torch.randn(2, *model.spec.input_size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, model.spec.output_dim)
    assert torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # the two images give different embeddings


def test_small_embedding_variant():
    model = build_model("seesawfacenet", embedding_size=64).eval()
    assert model.spec.output_dim == 64 and get_spec("seesawfacenet").output_dim == 512
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 64)


def test_channel_shuffle_interleaves_two_groups():
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_seesaw_variants_differ_where_the_paper_says():
    shuffle = build_model("seesawfacenet")
    share = build_model("seesawfacenet-share")
    assert any(isinstance(m, ChannelShuffle) for m in shuffle.modules())
    assert not any(isinstance(m, ChannelShuffle) for m in share.modules())
    # share splits the expanded channels 3/4 : 1/4 before projecting
    block = next(m for m in share.modules() if isinstance(m, SeesawBlock))
    assert block.project_a[0].in_channels == 3 * block.project_b[0].in_channels
    # DW variants: a mapping shortcut on the three down-sampling blocks only
    for name, kind in (("dw-seesawfacenet-v1", torch.nn.Conv2d), ("dw-seesawfacenet-v2", torch.nn.MaxPool2d)):
        blocks = [m for m in build_model(name).modules() if isinstance(m, SeesawBlock)]
        mapped = [b for b in blocks if b.mapping is not None]
        assert len(blocks) == 3 + 8 + 12 + 4 and len(mapped) == 3
        assert any(isinstance(m, kind) for m in mapped[0].mapping.modules())


def test_vargfacenet_uses_groups_of_eight_channels():
    model = build_model("vargfacenet")
    grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert grouped and all(m.in_channels // m.groups == 8 for m in grouped)


def test_vargfacenet_zero_init_residual_starts_each_block_as_its_shortcut():
    from toolchain.models.vargfacenet import DownBlock, NormalBlock

    torch.manual_seed(0)
    model = build_model("vargfacenet", zero_init_residual=True).eval()
    plain = build_model("vargfacenet").eval()
    block = next(m for m in model.modules() if isinstance(m, NormalBlock) and isinstance(m.shortcut, torch.nn.Identity))
    x = torch.randn(2, block.act.num_parameters, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), block.act(x))  # the branch adds exactly zero
        down = next(m for m in model.modules() if isinstance(m, DownBlock))
        y = torch.randn(1, down.shortcut[0][0].in_channels, 8, 8)
        assert torch.allclose(down(y), down.act(down.shortcut(y)))
    zeroed = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.any()]
    assert len(zeroed) == sum(isinstance(m, (NormalBlock, DownBlock)) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not m.weight.any() for m in plain.modules())
