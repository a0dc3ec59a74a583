"""Face data: the synthetic generator, readers of the real formats, transforms.

Names are imported lazily so that `import toolchain.data.synthetic` (numpy + Pillow only) does
not pull in torch.

- `load_identity_dataset(path, transform=None)`: RecordIO folder/.rec or image folders.
- `load_pairs(path) -> VerificationPairs`: .bin, LFW root/pairs.txt, pairs.tsv.
- `SyntheticIdentityDataset`, `default_benchmark()`, `SyntheticFaces`, `write_synthetic`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_identity_dataset": "toolchain.data.datasets",
    "IdentityDataset": "toolchain.data.datasets",
    "ArrayIdentityDataset": "toolchain.data.datasets",
    "SyntheticIdentityDataset": "toolchain.data.datasets",
    "RecordIODataset": "toolchain.data.datasets",
    "ImageFolderDataset": "toolchain.data.datasets",
    "load_pairs": "toolchain.data.pair_files",
    "VerificationPairs": "toolchain.data.pairs",
    "SyntheticFaces": "toolchain.data.synthetic",
    "SyntheticBenchmark": "toolchain.data.synthetic",
    "default_benchmark": "toolchain.data.synthetic",
    "write_synthetic": "toolchain.data.writers",
    "inspect_path": "toolchain.data.inspect",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'toolchain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
