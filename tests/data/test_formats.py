"""Round trips through every format: what is written is read back identically."""

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.data import load_identity_dataset, load_pairs
from toolchain.data import recordio
from toolchain.data.codec import decode_image, encode_jpeg
from toolchain.data.insightface_bin import read_bin, write_bin
from toolchain.data.lfw import read_lfw, write_lfw
from toolchain.data.transforms import hflip, to_tensor, to_uint8
from toolchain.data.writers import benchmark_for, write_synthetic
from toolchain.errors import ToolchainError

N_IDS, K = 6, 3


@pytest.fixture(scope="module")
def bench():
    return benchmark_for(N_IDS, K, seed=5)


def _expected_train(bench):
    g = bench.generator()
    ids = np.repeat(np.arange(N_IDS), K)
    idx = np.tile(np.arange(K), N_IDS)
    return [g.render_jpeg(i, j) for i, j in zip(ids, idx)], ids


def _expected_pairs(bench):
    g = bench.generator()
    rows = bench.pair_list()
    a = np.stack([decode_image(g.render_jpeg(r[0], r[1])) for r in rows])
    b = np.stack([decode_image(g.render_jpeg(r[2], r[3])) for r in rows])
    return a, b, rows[:, 4].astype(bool)


@pytest.mark.parametrize("fmt", ["folder", "insightface"])
def test_round_trip(tmp_path, bench, fmt):
    out = tmp_path / "data"
    summary = write_synthetic(out, N_IDS, K, seed=5, fmt=fmt, workers=1)
    assert summary["train_images"] == N_IDS * K and summary["pairs"] == bench.pairs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial left behind

    jpegs, ids = _expected_train(bench)
    ds = load_identity_dataset(out)
    assert len(ds) == N_IDS * K and ds.num_classes == N_IDS
    np.testing.assert_array_equal(ds.labels, ids)
    for k in range(len(ds)):
        np.testing.assert_array_equal(ds.get_uint8(k), decode_image(jpegs[k]))
    x, y = ds[4]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32 and y == ids[4]
    np.testing.assert_allclose(x, to_tensor(decode_image(jpegs[4])))

    pairs = load_pairs(out)
    a, b, same = _expected_pairs(bench)
    np.testing.assert_array_equal(pairs.issame, same)
    np.testing.assert_array_equal(pairs.images_a, a)
    np.testing.assert_array_equal(pairs.images_b, b)


def test_recordio_bytes_are_the_generator_jpegs(tmp_path, bench):
    write_synthetic(tmp_path / "d", N_IDS, K, seed=5, fmt="insightface")
    rec = recordio.RecordFile(tmp_path / "d" / "train.rec")
    jpegs, ids = _expected_train(bench)
    h0, body0 = rec.read_unpacked(0)
    assert h0.flag == 2 and list(h0.label) == [N_IDS * K + 1, N_IDS * K + 1 + N_IDS] and body0 == b""
    for key in range(1, N_IDS * K + 1):
        h, body = rec.read_unpacked(key)
        assert h.flag == 0 and h.label == ids[key - 1] and h.id == key
        assert body == jpegs[key - 1]
    h, _ = rec.read_unpacked(N_IDS * K + 2)  # identity 1's record: images [K+1, 2K+1)
    assert list(h.label) == [K + 1, 2 * K + 1]
    assert (tmp_path / "d" / "property").read_text() == f"{N_IDS},112,112"
    # The .bin holds the generator's bytes too, pair k at bins[2k], bins[2k+1].
    with open(tmp_path / "d" / "synthetic.bin", "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")  # our own file: plain pickle is fine here
    rows = bench.pair_list()
    g = bench.generator()
    assert bins[0] == g.render_jpeg(rows[0, 0], rows[0, 1]) and bins[1] == g.render_jpeg(rows[0, 2], rows[0, 3])
    assert issame == [bool(s) for s in rows[:, 4]]


def test_recordio_splits_at_aligned_magic_like_dmlc(tmp_path):
    magic = struct.pack("<I", recordio.MAGIC)
    payload = b"abcd" + magic + b"efgh" + magic + b"ij" + magic[:3]  # two aligned magics, one cut short
    unaligned = b"x" + magic + b"yzw"  # magic at offset 1: not split
    with recordio.RecordWriter(tmp_path / "t.rec", tmp_path / "t.idx") as w:
        w.write(0, payload)
        w.write(1, unaligned)
    raw = (tmp_path / "t.rec").read_bytes()
    flags = []
    pos = 0
    while pos < len(raw):
        m, lrec = struct.unpack_from("<II", raw, pos)
        assert m == recordio.MAGIC
        flags.append(lrec >> 29)
        pos += 8 + (lrec & ((1 << 29) - 1)) + (-(lrec & ((1 << 29) - 1))) % 4
    assert flags == [1, 2, 3, 0]
    rec = recordio.RecordFile(tmp_path / "t.rec")
    assert rec.read(0) == payload
    assert rec.read(1) == unaligned


def test_recordio_reads_a_hand_built_split_record(tmp_path):
    magic = struct.pack("<I", recordio.MAGIC)

    def part(cflag, data):
        return magic + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * ((-len(data)) % 4)

    header = recordio.pack(recordio.Header(0, 3.0, 1, 0), b"")
    blob = part(1, header + b"HEAD") + part(2, b"") + part(3, b"tail!")
    (tmp_path / "x.rec").write_bytes(part(0, b"zero") + blob)
    (tmp_path / "x.idx").write_text(f"0\t0\n1\t{8 + 4}\n")
    rec = recordio.RecordFile(tmp_path / "x.rec")
    assert rec.read(1) == header + b"HEAD" + magic + magic + b"tail!"
    h, body = rec.read_unpacked(1)
    assert h.label == 3.0 and body == b"HEAD" + magic + magic + b"tail!"


def test_recordio_without_identity_records(tmp_path):
    # A plain im2rec file: no record 0 header, labels only in the image records.
    jpgs = [encode_jpeg(np.full((112, 112, 3), v, np.uint8)) for v in (10, 120, 240)]
    with recordio.RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for k, (lab, j) in enumerate(zip([0, 2, 1], jpgs)):
            w.write(k, recordio.pack(recordio.Header(0, float(lab), k, 0), j))
    ds = load_identity_dataset(tmp_path)
    np.testing.assert_array_equal(ds.labels, [0, 2, 1])
    assert ds.num_classes == 3
    np.testing.assert_array_equal(ds.get_uint8(1), decode_image(jpgs[1]))


def test_bin_with_uint8_arrays_and_numpy_bools(tmp_path):
    imgs = [np.random.default_rng(k).integers(0, 255, (112, 112, 3), dtype=np.uint8) for k in range(4)]
    jpgs = [encode_jpeg(im) for im in imgs]
    bins = [np.frombuffer(j, dtype=np.uint8) for j in jpgs]
    for proto in (2, 4, 5):
        p = tmp_path / f"a{proto}.bin"
        p.write_bytes(pickle.dumps((bins, np.array([True, False])), protocol=proto))
        pairs = read_bin(p)
        assert pairs.name == f"a{proto}"
        np.testing.assert_array_equal(pairs.issame, [True, False])
        np.testing.assert_array_equal(pairs.images_a[1], decode_image(jpgs[2]))
        np.testing.assert_array_equal(pairs.images_b[1], decode_image(jpgs[3]))


def test_bin_round_trip(tmp_path):
    jpgs = [encode_jpeg(np.full((112, 112, 3), 40 * k, np.uint8)) for k in range(6)]
    write_bin(tmp_path / "x.bin", jpgs, [True, False, True])
    pairs = load_pairs(tmp_path / "x.bin")
    np.testing.assert_array_equal(pairs.issame, [True, False, True])
    np.testing.assert_array_equal(pairs.images_b[2], decode_image(jpgs[5]))


def test_pairs_take_the_identities_written_beside_them(tmp_path):
    from toolchain.data.split import write_pair_identities

    jpgs = [encode_jpeg(np.full((112, 112, 3), 40 * k, np.uint8)) for k in range(6)]
    write_bin(tmp_path / "x.bin", jpgs, [True, False, True])
    assert load_pairs(tmp_path / "x.bin").identities is None
    write_pair_identities(tmp_path / "pair_identities.json", [4, 4, 7], [4, 5, 7])
    pairs = load_pairs(tmp_path / "x.bin")
    np.testing.assert_array_equal(pairs.identities[0], [4, 4, 7])
    np.testing.assert_array_equal(pairs.subset(2).identities[1], [4, 5])
    images, ia, ib = pairs.distinct()
    np.testing.assert_array_equal(pairs.distinct_identities(ia, ib, len(images)), [4, 4, 4, 5, 7, 7])
    write_pair_identities(tmp_path / "pair_identities.json", [4, 4, 7], [4, 4, 7])  # pair 2 is not a match
    with pytest.raises(ToolchainError, match="disagree with issame"):
        load_pairs(tmp_path / "x.bin")
    write_pair_identities(tmp_path / "pair_identities.json", [4, 4], [4, 5])
    with pytest.raises(ToolchainError, match="identities of"):
        load_pairs(tmp_path / "x.bin")


def test_lfw_round_trip(tmp_path):
    names = ["Ann_A", "Bob_B", "Cid_C"]
    rng = np.random.default_rng(0)
    jpegs = {(n, k): encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for n in names for k in (1, 2)}
    matched = [(names[s % 3], 1, 2) for s in range(10)]
    mismatched = [(names[s % 3], 1, names[(s + 1) % 3], 2) for s in range(10)]
    write_lfw(tmp_path, matched, mismatched, jpegs)
    assert (tmp_path / "pairs.txt").read_text().splitlines()[:2] == ["10\t1", "Ann_A\t1\t2"]
    for path in (tmp_path, tmp_path / "pairs.txt"):
        pairs = load_pairs(path)
        assert len(pairs) == 20 and pairs.name == "lfw"
        np.testing.assert_array_equal(pairs.issame, np.tile([True, False], 10))
        np.testing.assert_array_equal(pairs.images_a[1], decode_image(jpegs[(mismatched[0][0], 1)]))
        np.testing.assert_array_equal(pairs.images_b[1], decode_image(jpegs[(mismatched[0][2], 2)]))
    pairs = read_lfw(tmp_path)
    np.testing.assert_array_equal(pairs.images_b[0], decode_image(jpegs[("Ann_A", 2)]))


def test_plain_identity_folder_and_resize(tmp_path):
    for name, size in (("alice", 112), ("bob", 150)):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.fromarray(np.full((size, size, 3), 50 * k, np.uint8)).save(tmp_path / name / f"{k}.png")
    ds = load_identity_dataset(tmp_path)
    assert ds.num_classes == 2 and list(ds.labels) == [0, 0, 1, 1] and ds.classes == ["alice", "bob"]
    assert ds.get_uint8(3).shape == (112, 112, 3)  # resized from 150
    np.testing.assert_array_equal(ds.get_uint8(1), np.full((112, 112, 3), 50, np.uint8))  # png: lossless


def test_transforms():
    imgs = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    x = to_tensor(imgs)
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert to_tensor(imgs[0]).shape == (3, 112, 112)
    np.testing.assert_array_equal(to_uint8(x), imgs)
    np.testing.assert_array_equal(to_uint8(hflip(x)), hflip(imgs))
    np.testing.assert_array_equal(hflip(imgs)[0, :, 0], imgs[0, :, -1])
    with pytest.raises(ValueError):
        to_tensor(imgs.astype(np.float32))


def test_load_pairs_refuses_unknown(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ToolchainError, match="not a pairs file"):
        load_pairs(tmp_path / "notes.md")
    with pytest.raises(ToolchainError, match="no verification pairs"):
        load_pairs(tmp_path)


def test_overwrite_replaces_and_defaults(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ToolchainError, match="not empty"):
        write_synthetic(out, 2, 1, fmt="folder")
    s = write_synthetic(out, 2, 1, fmt="folder", overwrite=True)
    assert not (out / "old.txt").exists() and (out / "pairs.tsv").is_file()
    # Held-out defaults: 2 families of 4, 2 images each, pairs a multiple of 20.
    assert (s["val_identities"], s["val_images_per_identity"], s["pairs"], s["val_offset"]) == (8, 2, 40, 4)
    with pytest.raises(ToolchainError, match="unknown format"):
        write_synthetic(tmp_path / "e", 2, 1, fmt="tfrecord")
    assert not (tmp_path / "e").exists()
