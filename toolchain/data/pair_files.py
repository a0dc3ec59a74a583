"""`load_pairs(path)`: verification pairs from any pair format, dispatched on what `path` is:
- an insightface `.bin` (a restricted unpickler reads it, see insightface_bin.py);
- an LFW root (holding `pairs.txt` and `lfw/`) or a `pairs.txt` beside `lfw/`;
- a folder-format root holding `pairs.tsv` (this toolchain's list, see folder.py), or the
  `pairs.tsv` itself;
- a folder holding exactly one `.bin` (an insightface data folder).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from toolchain.data.folder import read_pairs_tsv
from toolchain.data.insightface_bin import read_bin
from toolchain.data.lfw import read_lfw
from toolchain.data.pairs import VerificationPairs
from toolchain.data.split import read_pair_identities
from toolchain.errors import ToolchainError


def load_pairs(path) -> VerificationPairs:
    """Read verification pairs from a .bin, an LFW root / pairs.txt, or a pairs.tsv folder, with
    the person of each pair side where a `pair_identities.json` lies beside them (toolchain.data.split)."""
    pairs = _read_pairs(Path(path))
    identities = read_pair_identities(path)
    return pairs if identities is None else dataclasses.replace(pairs, identities=identities)


def _read_pairs(p: Path) -> VerificationPairs:
    if not p.exists():
        raise ToolchainError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == ".bin":
            return read_bin(p)
        if p.name == "pairs.tsv":
            return read_pairs_tsv(p)
        if p.suffix == ".txt":
            return read_lfw(p.parent, pairs_file=p)
        raise ToolchainError(f"{p}: not a pairs file (.bin, LFW pairs.txt or pairs.tsv)")
    if (p / "pairs.tsv").is_file():
        return read_pairs_tsv(p / "pairs.tsv")
    if (p / "pairs.txt").is_file():
        return read_lfw(p)
    bins = sorted(p.glob("*.bin"))
    if len(bins) == 1:
        return read_bin(bins[0])
    if len(bins) > 1:
        raise ToolchainError(f"{p}: holds several .bin files ({', '.join(b.name for b in bins)}); name one")
    raise ToolchainError(f"{p}: no verification pairs found (expected a .bin, pairs.txt with lfw/, or pairs.tsv)")
