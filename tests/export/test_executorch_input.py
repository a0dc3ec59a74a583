"""The .pte's channels-last input (toolchain.export.executorch): one XNNPACK partition, the
image's NHWC buffer in, the same numbers out."""

import numpy as np
import torch
from torch import nn

from toolchain.export.executorch import channels_last, drop_noop_strided_copies, export_executorch


class Pooled(nn.Module):
    """conv -> global average pool -> flatten -> linear: the shape of every model here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def _edge_ops(example):
    from executorch.exir import to_edge

    program = torch.export.export(Pooled().eval(), (example,), strict=False)
    return to_edge(program).exported_program().graph_module


def test_pool_on_channels_last_input_gets_a_noop_strided_copy_and_the_pass_drops_it():
    gm = _edge_ops(channels_last(torch.zeros(1, 3, 16, 16)))
    strided = [n for n in gm.graph.nodes if "as_strided_copy" in str(n.target)]
    assert strided, "no as_strided_copy: the pass has nothing to prove here"
    result = drop_noop_strided_copies(gm)
    assert result.modified
    assert not [n for n in gm.graph.nodes if "as_strided_copy" in str(n.target)]


def test_a_real_strided_copy_is_kept():
    class Strided(nn.Module):
        def forward(self, x):
            return torch.as_strided(x, (2, 2), (1, 2))  # a transpose: elements move

    from executorch.exir import to_edge

    gm = to_edge(torch.export.export(Strided(), (torch.arange(4.0).reshape(2, 2),), strict=False)) \
        .exported_program().graph_module
    before = sum("as_strided_copy" in str(n.target) for n in gm.graph.nodes)
    assert before == 1
    assert not drop_noop_strided_copies(gm).modified


def test_channels_last_pte_is_one_partition_and_matches_torch(tmp_path):
    from executorch.runtime import Runtime

    torch.manual_seed(0)
    model = Pooled().eval()
    example = torch.randn(1, 3, 16, 16)
    data, _meta, report = export_executorch(model, example, "fp32", None, (0.5,) * 3, (0.5,) * 3,
                                            require_full_delegation=True,
                                            metadata_fn=lambda q: {"model": "pooled", "input": {}})
    assert report.partitions == 1 and not report.ops_outside
    assert report.input_dim_order == (0, 2, 3, 1)
    (tmp_path / "m.pte").write_bytes(data)
    method = Runtime.get().load_program(str(tmp_path / "m.pte")).load_method("forward")
    nhwc = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
    x = torch.from_numpy(nhwc).permute(0, 3, 1, 2)  # the NHWC buffer, viewed as NCHW
    out = method.execute([x])[0]
    np.testing.assert_allclose(out.numpy(), model(x.contiguous()).detach().numpy(), atol=1e-5)
