import numpy as np
import pytest
from PIL import Image

from toolchain.errors import ToolchainError
from toolchain.quantize.calibration import build_calibration_set, load_images


def _imgs(n, seed=0, hw=(112, 112)):
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_verifier_set_mixes_enrollment_and_negatives():
    enroll, neg = _imgs(2, 1), _imgs(50, 2)
    cal = build_calibration_set("verifier", enrollment=enroll, negatives=neg, size=16)
    assert cal.dtype == np.uint8 and cal.shape == (16, 112, 112, 3)
    views = {e.tobytes() for e in np.concatenate([enroll, enroll[:, :, ::-1]])}
    n_user = sum(c.tobytes() in views for c in cal)
    negs = {n.tobytes() for n in neg}
    n_neg = sum(c.tobytes() in negs for c in cal)
    assert n_user == 4 and n_neg == 12  # both enrollment images and their mirrors, negatives fill the rest


def test_backbone_set_is_a_deterministic_sample():
    ids = _imgs(40, 3)
    a = build_calibration_set("backbone", images=ids, size=10, seed=5)
    b = build_calibration_set("backbone", images=ids, size=10, seed=5)
    assert a.shape == (10, 112, 112, 3) and np.array_equal(a, b)
    assert len(build_calibration_set("backbone", images=ids, size=100)) == 40


@pytest.mark.parametrize("kwargs, msg", [
    (dict(kind="verifier", enrollment=None, negatives=_imgs(3)), "enrollment"),
    (dict(kind="verifier", enrollment=_imgs(1), negatives=None), "negatives"),
    (dict(kind="backbone", images=None), "identity images"),
    (dict(kind="backbone", images=np.zeros((0, 112, 112, 3), np.uint8)), "empty"),
    (dict(kind="backbone", images=_imgs(2, hw=(100, 100))), "wrong input size"),
    (dict(kind="backbone", images=_imgs(2).astype(np.float32)), "uint8"),
    (dict(kind="nonsense", images=_imgs(2)), "unknown calibration kind"),
])
def test_bad_calibration_data_is_refused(kwargs, msg):
    kind = kwargs.pop("kind")
    with pytest.raises(ToolchainError, match=msg):
        build_calibration_set(kind, **kwargs)


def test_load_images_from_files(tmp_path):
    imgs = _imgs(3)
    np.save(tmp_path / "a.npy", imgs)
    np.savez(tmp_path / "b.npz", images=imgs)
    folder = tmp_path / "folder" / "person"
    folder.mkdir(parents=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    for p in ("a.npy", "b.npz", "folder"):
        assert np.array_equal(load_images(tmp_path / p, (112, 112)), imgs)
    with pytest.raises(ToolchainError, match="no such file"):
        load_images(tmp_path / "missing.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolchainError, match="no image files"):
        load_images(tmp_path / "empty")
    cal = build_calibration_set("backbone", images=tmp_path / "a.npy", size=2)
    assert cal.shape == (2, 112, 112, 3)
