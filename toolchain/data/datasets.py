"""Identity (training) datasets as torch Datasets.

Every dataset returns `(image, label)`: a float32 3x112x112 tensor normalised as
(x/255 - 0.5)/0.5, then passed through `transform` if given (a callable on that CHW tensor,
e.g. transforms.RandomHFlip()), and an int label in 0..num_classes-1. Each has `num_classes`,
`labels` (np.ndarray of every item's label, for samplers) and `get_uint8(i)` (the raw HWC image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from toolchain.data import recordio
from toolchain.data.codec import decode_image
from toolchain.data.folder import read_image_file, scan_identity_folder
from toolchain.data.synthetic import SyntheticBenchmark, default_benchmark, render_many
from toolchain.data.transforms import to_tensor
from toolchain.errors import ToolchainError


class IdentityDataset(Dataset):
    labels: np.ndarray
    num_classes: int

    def __init__(self, transform=None):
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def get_uint8(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        x = to_tensor(self.get_uint8(int(i) % len(self)))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class ArrayIdentityDataset(IdentityDataset):
    """Images held in memory: (N,112,112,3) uint8 plus labels."""

    def __init__(self, images: np.ndarray, labels, num_classes: int | None = None, transform=None):
        super().__init__(transform)
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
            raise ToolchainError(f"expected (N,H,W,3) uint8 images and N labels, got {images.shape} {images.dtype} "
                                 f"and {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes if num_classes is not None else (labels.max() + 1 if len(labels) else 0))

    def get_uint8(self, i: int) -> np.ndarray:
        return self.images[i]


class SyntheticIdentityDataset(ArrayIdentityDataset):
    """The training split of a SyntheticBenchmark, rendered into memory at construction.

    Labels are the training identities 0..train_identities-1 (the verification identities of the
    benchmark are never included). `identities` holds the generator identity of each item.
    """

    def __init__(self, benchmark=None, transform=None, workers: int = 1, progress=None, **overrides):
        if benchmark is None:
            benchmark = default_benchmark(**overrides)
        elif overrides:
            raise TypeError("give a benchmark or field overrides, not both")
        if not isinstance(benchmark, SyntheticBenchmark):
            raise TypeError("benchmark must be a SyntheticBenchmark")
        self.benchmark = benchmark
        k = benchmark.images_per_identity
        ids = np.repeat(benchmark.train_ids, k)
        idx = np.tile(np.arange(k), benchmark.train_identities)
        images = render_many(benchmark.generator(), ids, idx, workers=workers, progress=progress)
        super().__init__(images, ids, benchmark.train_identities, transform)
        self.identities = ids


class RecordIODataset(IdentityDataset):
    """insightface `train.rec`/`train.idx`: images are read lazily, one record per item.

    Labels come from the identity records when record 0 announces them (insightface layout),
    else from each image record's header (read once at construction).
    """

    def __init__(self, path, transform=None):
        super().__init__(transform)
        rec_path, idx_path, prop_path = recordio.resolve_rec(path)
        if not idx_path.is_file():
            raise ToolchainError(f"{idx_path}: missing .idx (RecordIO needs the index beside {rec_path.name})")
        self.rec = recordio.RecordFile(rec_path, idx_path)
        self.property = recordio.read_property(prop_path)
        keys = self.rec.keys()
        header0, _ = self.rec.read_unpacked(0) if 0 in self.rec.offsets else (None, b"")
        if header0 is not None and header0.flag > 0:
            lab = np.asarray(header0.label)
            id_start, id_end = int(lab[0]), int(lab[1])
            self.keys = np.arange(1, id_start, dtype=np.int64)
            labels = np.full(len(self.keys), -1, dtype=np.int64)
            for c, key in enumerate(range(id_start, id_end)):
                h, _ = self.rec.read_unpacked(key)
                lo, hi = (int(v) for v in np.asarray(h.label)[:2])
                if not 1 <= lo <= hi <= id_start:
                    raise ToolchainError(f"{rec_path.name}: identity record {key} has image range [{lo}, {hi})")
                labels[lo - 1:hi - 1] = c
            if (labels < 0).any():
                raise ToolchainError(f"{rec_path.name}: {int((labels < 0).sum())} images belong to no identity record")
            self.num_classes = id_end - id_start
        else:
            self.keys = np.asarray([k for k in keys if k != 0 or header0 is None or header0.flag == 0], dtype=np.int64)
            labels = np.empty(len(self.keys), dtype=np.int64)
            for n, key in enumerate(self.keys):
                h, _ = self.rec.read_unpacked(int(key))
                labels[n] = int(h.label if h.flag == 0 else np.asarray(h.label)[0])
            self.num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.labels = labels
        if self.property is not None and self.property[0] != self.num_classes:
            raise ToolchainError(f"{prop_path}: says {self.property[0]} classes, the records hold {self.num_classes}")

    def get_uint8(self, i: int) -> np.ndarray:
        key = int(self.keys[i])
        _, img = self.rec.read_unpacked(key)
        return decode_image(img, f"{self.rec.name} key {key}")


class ImageFolderDataset(IdentityDataset):
    """One folder per identity; images are decoded lazily."""

    def __init__(self, root, transform=None):
        super().__init__(transform)
        self.paths, self.labels, self.classes = scan_identity_folder(root)
        self.num_classes = len(self.classes)

    def get_uint8(self, i: int) -> np.ndarray:
        return read_image_file(self.paths[i])


def load_identity_dataset(path, transform=None) -> IdentityDataset:
    """Dispatch on the layout: a RecordIO folder or .rec; a synthetic folder-format root (its
    `train/`); or a one-folder-per-identity tree."""
    p = Path(path)
    if not p.exists():
        raise ToolchainError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == ".rec":
            return RecordIODataset(p, transform)
        raise ToolchainError(f"{p}: not an identity dataset (a .rec, or a folder of identity folders)")
    if any(p.glob("*.rec")):
        return RecordIODataset(p, transform)
    if (p / "train").is_dir() and (p / "pairs.tsv").is_file():
        return ImageFolderDataset(p / "train", transform)
    return ImageFolderDataset(p, transform)
