"""BatchNorm folded into the convolution before it, as the int8 files fold it.

QAT trains the folded weights themselves (torchao's simulated conv+BN folding, whose eps is fixed
at 1e-5 while VarGFaceNet's BatchNorm uses 2e-5, is not involved), and bias correction compares
the int8 graph's convolutions, whose BatchNorm PT2E folded in, with these folded float ones.
"""

from __future__ import annotations

import copy

from torch import nn


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` with each BatchNorm2d that follows a Conv2d in an nn.Sequential folded
    into it, as the int8 files fold it; (copy, folds). Exact in float up to rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    folds = 0
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                folds += 1
    return model, folds
