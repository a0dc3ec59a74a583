"""BatchNorm folded into the convolution or linear layer before it, as the int8 files fold it.

QAT trains the folded weights themselves (torchao's simulated conv+BN folding, whose eps is fixed
at 1e-5 while VarGFaceNet's BatchNorm uses 2e-5, is not involved), and bias correction compares
the int8 graph's convolutions, whose BatchNorm PT2E folded in, with these folded float ones.
PT2E folds an embedding head's Linear -> BatchNorm1d too, so that pair is folded here as well: left
unfolded, bias correction compared VarGFaceNet's folded int8 linear (after its BatchNorm) with the
float linear before it, moved every bias by the BatchNorm's whole shift, and the int8 `.pte`'s
embedding cosine fell to 0.57; MobileFaceNet's bias-free linear was silently never corrected.
"""

from __future__ import annotations

import copy

from torch import nn


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` with each BatchNorm2d that follows a Conv2d, and each BatchNorm1d that
    follows a Linear, in an nn.Sequential folded into it, as the int8 files fold them; (copy,
    folds). Exact in float up to rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    model = copy.deepcopy(model).eval()
    folds = 0
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d) and bn.track_running_stats):
                continue
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
            elif isinstance(conv, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                seq._modules[a] = fuse_linear_bn_eval(conv, bn)
            else:
                continue
            seq._modules[b] = nn.Identity()
            folds += 1
    return model, folds
