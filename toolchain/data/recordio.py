"""MXNet RecordIO (`train.rec` + `train.idx` + `property`) without MXNet.

On disk (dmlc-core recordio): each part is a little-endian uint32 magic 0xced7230a, a uint32
`lrec` whose top 3 bits are a continuation flag and low 29 bits the part length, the part, and
zero padding to 4 bytes. dmlc's writer splits a record wherever the magic word occurs in the
payload at a 4-byte aligned offset: the parts are flagged 1 (first), 2 (middle), 3 (last), the
magic word itself is dropped and the reader puts it back between parts. A whole record has flag
0. Records must be shorter than 2^29 bytes.

Payload (mxnet.recordio.pack): a header struct 'IfQQ' (flag, label, id, id2); when flag > 0,
`flag` float32 labels follow the header and `label` is unused.

insightface layout: record 0 has flag 2 and labels [first identity key, end); image records
have keys 1..N and their identity as label; identity record k has labels [first image, end).
`property` holds "num_classes,112,112".
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes
_LEN_MASK = (1 << 29) - 1
MAX_RECORD = 1 << 29


@dataclass
class Header:
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: Header, payload: bytes) -> bytes:
    """A record payload: header (+ float32 labels when the label is an array) + bytes."""
    label = header.label
    if isinstance(label, (list, tuple, np.ndarray)):
        arr = np.asarray(label, dtype="<f4").reshape(-1)
        return _HEADER.pack(len(arr), 0.0, header.id, header.id2) + arr.tobytes() + bytes(payload)
    return _HEADER.pack(0, float(label), header.id, header.id2) + bytes(payload)


def unpack(record: bytes, what: str = "record") -> tuple[Header, bytes]:
    if len(record) < _HEADER.size:
        raise ToolchainError(f"{what}: {len(record)} bytes, shorter than the 24-byte header")
    flag, label, id_, id2 = _HEADER.unpack_from(record)
    body = record[_HEADER.size:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise ToolchainError(f"{what}: header announces {flag} labels but the record is too short")
        label = np.frombuffer(body, dtype="<f4", count=flag).copy()
        body = body[4 * flag:]
    return Header(flag, label, id_, id2), body


def _parts(record: bytes, split_at_magic: bool = True):
    """(cflag, part) pieces of one record, splitting at aligned magic words like dmlc does."""
    n = len(record)
    if n >= MAX_RECORD:
        raise ToolchainError(f"record of {n} bytes: RecordIO records must be shorter than 2^29 bytes")
    cuts = []
    if split_at_magic:
        pos = record.find(_MAGIC_BYTES)
        while pos != -1:
            if pos % 4 == 0 and pos + 4 <= (n // 4) * 4:
                cuts.append(pos)
                pos = record.find(_MAGIC_BYTES, pos + 4)
            else:
                pos = record.find(_MAGIC_BYTES, pos + 1)
    if not cuts:
        return [(0, record)]
    out, start = [], 0
    for k, c in enumerate(cuts):
        out.append((1 if k == 0 else 2, record[start:c]))
        start = c + 4
    out.append((3, record[start:]))
    return out


def encode_record(record: bytes) -> bytes:
    """The on-disk bytes of one record (all its parts, padded)."""
    chunks = []
    for cflag, part in _parts(record):
        chunks.append(struct.pack("<II", MAGIC, (cflag << 29) | len(part)))
        chunks.append(part)
        pad = (-len(part)) % 4
        if pad:
            chunks.append(b"\0" * pad)
    return b"".join(chunks)


class RecordWriter:
    """Writes `.rec` and `.idx` under temporary names; `close()` moves them into place."""

    def __init__(self, rec_path, idx_path):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec_tmp = self.rec_path.with_name(self.rec_path.name + ".partial")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".partial")
        self._rec = open(self._rec_tmp, "wb")
        self._idx = open(self._idx_tmp, "w")
        self._keys: set[int] = set()

    def write(self, key: int, record: bytes) -> None:
        if key in self._keys:
            raise ToolchainError(f"record key {key} written twice")
        self._keys.add(key)
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        self._rec.write(encode_record(record))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()
        os.replace(self._rec_tmp, self.rec_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        for f, p in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            f.close()
            p.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_record_at(f, offset: int, name: str, size: int | None = None) -> tuple[bytes, int]:
    """Read the record starting at `offset` of open file `f`; returns (record, end offset).

    Joins continued parts (flags 1, 2.., 3), putting the magic word back between them.
    """
    if size is None:
        size = os.fstat(f.fileno()).st_size
    f.seek(offset)
    pieces = []
    pos = offset
    first = True
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ToolchainError(f"{name}: truncated record at offset {pos} (header cut short)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise ToolchainError(f"{name}: bad magic 0x{magic:08x} at offset {pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        padded = length + (-length) % 4
        if pos + 8 + padded > size:
            raise ToolchainError(
                f"{name}: truncated record at offset {pos} (needs {padded} bytes, {size - pos - 8} left)")
        if first and cflag not in (0, 1):
            raise ToolchainError(f"{name}: record at offset {pos} starts with continuation flag {cflag}")
        if not first and cflag not in (2, 3):
            raise ToolchainError(f"{name}: continued record at offset {offset} has a part with flag {cflag}")
        if not first:
            pieces.append(_MAGIC_BYTES)
        pieces.append(f.read(length))
        if padded != length:
            f.seek(padded - length, os.SEEK_CUR)
        pos += 8 + padded
        first = False
        if cflag in (0, 3):
            return b"".join(pieces), pos


def read_idx(idx_path) -> dict[int, int]:
    p = Path(idx_path)
    if not p.is_file():
        raise ToolchainError(f"{p}: missing .idx (RecordIO needs the index beside the .rec)")
    out: dict[int, int] = {}
    with open(p, "r", encoding="ascii", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t")
            try:
                if len(parts) != 2:
                    raise ValueError
                out[int(parts[0])] = int(parts[1])
            except ValueError:
                raise ToolchainError(f"{p}: line {n} is not 'key<TAB>offset': {line[:60]!r}") from None
    if not out:
        raise ToolchainError(f"{p}: empty index")
    return out


def resolve_rec(path) -> tuple[Path, Path, Path]:
    """(rec, idx, property) paths for a RecordIO folder or a .rec file."""
    p = Path(path)
    if p.is_dir():
        recs = sorted(p.glob("*.rec"))
        if not recs:
            raise ToolchainError(f"{p}: no .rec file")
        rec = p / "train.rec" if (p / "train.rec").exists() else recs[0]
    else:
        rec = p
    if not rec.is_file():
        raise ToolchainError(f"{rec}: no such file")
    return rec, rec.with_suffix(".idx"), rec.parent / "property"


class RecordFile:
    """Random access to the records of a `.rec` by key, through its `.idx`.

    The file handle is opened lazily and per process, so a DataLoader's forked workers each get
    their own (a shared handle's seek position would be raced)."""

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise ToolchainError(f"{self.rec_path}: no such file")
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self.offsets = read_idx(self.idx_path)
        self.size = self.rec_path.stat().st_size
        self.name = self.rec_path.name
        for key, off in self.offsets.items():
            if not 0 <= off < self.size:
                raise ToolchainError(f"{self.idx_path.name}: key {key} points to offset {off}, outside "
                                     f"{self.name} ({self.size} bytes)")
        self._f = None
        self._pid = None

    def _file(self):
        if self._f is None or self._pid != os.getpid():
            self._f = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._f

    def keys(self) -> list[int]:
        return sorted(self.offsets)

    def read(self, key: int) -> bytes:
        if key not in self.offsets:
            raise ToolchainError(f"{self.idx_path.name}: no key {key}")
        rec, _ = read_record_at(self._file(), self.offsets[key], f"{self.name} (key {key})", self.size)
        return rec

    def read_unpacked(self, key: int) -> tuple[Header, bytes]:
        return unpack(self.read(key), f"{self.name} key {key}")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_f"] = None
        d["_pid"] = None
        return d

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def iter_records(rec_path):
    """Walk a .rec from start to end: yields (offset, record). Validates every part."""
    p = Path(rec_path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        pos = 0
        while pos < size:
            rec, end = read_record_at(f, pos, p.name, size)
            yield pos, rec
            pos = end


def read_property(path) -> tuple[int, int, int] | None:
    p = Path(path)
    if not p.is_file():
        return None
    text = p.read_text(errors="replace").strip()
    try:
        vals = tuple(int(x) for x in text.split(","))
        if len(vals) != 3:
            raise ValueError
    except ValueError:
        raise ToolchainError(f"{p}: expected 'num_classes,height,width', got {text[:60]!r}") from None
    return vals


def write_insightface_rec(out_dir, jpegs, labels, image_size=(112, 112), name: str = "train") -> dict:
    """Write `name.rec`, `name.idx` and `property` in the insightface layout.

    jpegs: iterable of encoded images; labels: their identity labels 0..C-1, grouped (all images
    of one identity consecutive, identities in increasing order), as insightface's tools write.
    """
    out = Path(out_dir)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        raise ToolchainError("no images to write")
    if (np.diff(labels) < 0).any() or labels[0] != 0 or (np.diff(labels) > 1).any():
        raise ToolchainError("labels must run 0..C-1 with each identity's images consecutive")
    num_classes = int(labels[-1]) + 1
    first = np.searchsorted(labels, np.arange(num_classes), side="left") + 1  # image keys from 1
    end = np.searchsorted(labels, np.arange(num_classes), side="right") + 1
    id_start = n + 1
    with RecordWriter(out / f"{name}.rec", out / f"{name}.idx") as w:
        w.write(0, pack(Header(2, [id_start, id_start + num_classes], 0, 0), b""))
        k = 0
        for k, jpeg in enumerate(jpegs, 1):
            if k > n:
                raise ToolchainError("more images than labels")
            w.write(k, pack(Header(0, float(labels[k - 1]), k, 0), jpeg))
        if k != n:
            raise ToolchainError(f"{n} labels but {k} images")
        for c in range(num_classes):
            w.write(id_start + c, pack(Header(2, [first[c], end[c]], id_start + c, 0), b""))
    prop = out / "property"
    tmp = prop.with_name("property.partial")
    tmp.write_text(f"{num_classes},{image_size[0]},{image_size[1]}")
    os.replace(tmp, prop)
    return {"images": n, "identities": num_classes}
