"""`toolchain data synth` / `data inspect`, including exit 2 on each kind of malformed input."""

import json
import pickle
import shutil
import struct

import numpy as np
import pytest

from toolchain.cli import main
from toolchain.data.codec import encode_jpeg
from toolchain.data.lfw import write_lfw


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for fmt in ("folder", "insightface"):
        rc = main(["data", "synth", "--out", str(root / fmt), "--identities", "4", "--images-per-identity", "2",
                   "--seed", "1", "--format", fmt, "--workers", "1"])
        assert rc == 0
    return root


def _copy(generated, fmt, tmp_path):
    dst = tmp_path / fmt
    shutil.copytree(generated / fmt, dst)
    return dst


def _inspect(path, capsys, *extra):
    rc = main(["data", "inspect", str(path), *extra])
    return rc, capsys.readouterr()


def test_synth_and_inspect(generated, capsys):
    rc, out = _inspect(generated / "insightface", capsys, "--json")
    assert rc == 0
    info = json.loads(out.out)
    assert info["format"] == "RecordIO" and info["identities"] == 4 and info["images"] == 8
    assert info["pairs"] == 40 and info["matched_pairs"] == 20 and info["image_size"] == "112x112"
    rc, out = _inspect(generated / "folder", capsys, "--json")
    info = json.loads(out.out)
    assert rc == 0 and info["identities"] == 4 and info["images"] == 8 and info["pairs"] == 40
    rc, out = _inspect(generated / "insightface" / "synthetic.bin", capsys)
    assert rc == 0 and "112x112" in out.out and "40" in out.out
    rc, out = _inspect(generated / "folder" / "train", capsys)
    assert rc == 0 and "image folders" in out.out


def test_synth_refuses_non_empty_out_and_bad_pairs(generated, tmp_path, capsys):
    rc = main(["data", "synth", "--out", str(generated / "folder"), "--identities", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "not empty" in err
    rc = main(["data", "synth", "--out", str(tmp_path / "x"), "--identities", "4", "--pairs", "30"])
    assert rc == 2 and "multiple of 20" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _assert_exit2(path, capsys, *needles):
    rc, out = _inspect(path, capsys)
    err = out.err.strip()
    assert rc == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_truncated_record(generated, tmp_path, capsys):
    d = _copy(generated, "insightface", tmp_path)
    rec = d / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-100])
    _assert_exit2(d, capsys, "truncated record")


def test_bad_magic(generated, tmp_path, capsys):
    d = _copy(generated, "insightface", tmp_path)
    rec = d / "train.rec"
    data = bytearray(rec.read_bytes())
    offsets = [int(line.split("\t")[1]) for line in (d / "train.idx").read_text().splitlines()]
    struct.pack_into("<I", data, offsets[3], 0xDEADBEEF)
    rec.write_bytes(bytes(data))
    _assert_exit2(d, capsys, "bad magic", "0xdeadbeef")


def test_missing_idx(generated, tmp_path, capsys):
    d = _copy(generated, "insightface", tmp_path)
    (d / "train.idx").unlink()
    _assert_exit2(d, capsys, "missing .idx")
    _assert_exit2(d / "train.rec", capsys, "missing .idx")


def test_undecodable_jpeg_in_record(generated, tmp_path, capsys):
    d = _copy(generated, "insightface", tmp_path)
    from toolchain.data import recordio

    # Rewrite the file with image 2's JPEG cut short (a valid record holding a broken JPEG).
    src = recordio.RecordFile(d / "train.rec")
    keys = src.keys()
    records = {k: src.read(k) for k in keys}
    src.close()
    records[2] = records[2][:200]
    with recordio.RecordWriter(d / "train.rec", d / "train.idx") as w:
        for k in keys:
            w.write(k, records[k])
    _assert_exit2(d, capsys, "undecodable", "key 2")


def test_undecodable_jpeg_in_folder_and_bin(generated, tmp_path, capsys):
    d = _copy(generated, "folder", tmp_path)
    victim = sorted((d / "train").rglob("*.jpg"))[1]
    victim.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _assert_exit2(d, capsys, "undecodable", victim.name)
    jpg = encode_jpeg(np.zeros((112, 112, 3), np.uint8))
    (tmp_path / "x.bin").write_bytes(pickle.dumps(([jpg, b"\xff\xd8garbage"], [True]), protocol=4))
    _assert_exit2(tmp_path / "x.bin", capsys, "undecodable", "image 1")


def test_pairs_naming_missing_images(generated, tmp_path, capsys):
    d = _copy(generated, "folder", tmp_path)
    first = (d / "pairs.tsv").read_text().splitlines()[1].split("\t")[0]
    (d / first).unlink()
    _assert_exit2(d, capsys, "missing image", first.split("/")[-1])
    # LFW
    lfw = tmp_path / "lfw_root"
    jpg = encode_jpeg(np.zeros((112, 112, 3), np.uint8))
    write_lfw(lfw, [("A", 1, 2)] * 10, [("A", 1, "B", 1)] * 10, {("A", 1): jpg, ("A", 2): jpg, ("B", 1): jpg})
    rc, out = _inspect(lfw, capsys, "--json")
    assert rc == 0 and json.loads(out.out)["pairs"] == 20
    (lfw / "lfw" / "B" / "B_0001.jpg").unlink()
    _assert_exit2(lfw, capsys, "missing image", "B_0001.jpg")
    _assert_exit2(lfw / "pairs.txt", capsys, "missing image")


def test_malicious_bin_via_cli(tmp_path, capsys):
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil(), b"x"], [True]), protocol=2))
    _assert_exit2(tmp_path / "evil.bin", capsys, "unsafe pickle")
    assert not marker.exists()


def test_missing_path(tmp_path, capsys):
    _assert_exit2(tmp_path / "nope", capsys, "no such file")
