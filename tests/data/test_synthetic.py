"""The synthetic generator: deterministic by seed, independent of batching and workers."""

import numpy as np
import pytest

from toolchain.data.synthetic import SyntheticBenchmark, SyntheticFaces, default_benchmark, render_many
from toolchain.errors import ToolchainError


def test_render_shape_and_type():
    img = SyntheticFaces(seed=0).render(3, 1)
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert img.std() > 10  # not a blank image


def test_deterministic_by_seed_and_independent_of_batch_and_order():
    g = SyntheticFaces(seed=7)
    ids, idx = [5, 0, 9, 5, 2], [0, 3, 1, 1, 0]
    batch = g.render_batch(ids, idx)
    fresh = SyntheticFaces(seed=7)  # a new generator (no cached latents)
    for k in reversed(range(len(ids))):  # other order, one at a time
        np.testing.assert_array_equal(fresh.render(ids[k], idx[k]), batch[k])
    assert g.render_jpeg(9, 1) == SyntheticFaces(seed=7).render_jpeg(9, 1)


def test_workers_do_not_change_output():
    g = SyntheticFaces(seed=3)
    ids = np.repeat(np.arange(6), 12)
    idx = np.tile(np.arange(12), 6)
    one = render_many(g, ids, idx, workers=1)
    two = render_many(g, ids, idx, workers=2)
    np.testing.assert_array_equal(one, two)


def test_seeds_identities_and_images_differ():
    a = SyntheticFaces(seed=0).render(1, 0).astype(int)
    assert np.abs(a - SyntheticFaces(seed=1).render(1, 0)).mean() > 5
    assert np.abs(a - SyntheticFaces(seed=0).render(2, 0)).mean() > 5
    assert np.abs(a - SyntheticFaces(seed=0).render(1, 1)).mean() > 5


def test_families_share_latents():
    g = SyntheticFaces(seed=0, family_size=4)
    p0, p1, p4 = g.identity_params(0), g.identity_params(1), g.identity_params(4)
    assert p0.family == p1.family != p4.family
    # Family members look alike: their skin tones are much closer than across families (on average).
    same = np.mean([np.abs(np.subtract(g.identity_params(4 * f).skin, g.identity_params(4 * f + 1).skin)).sum()
                    for f in range(30)])
    other = np.mean([np.abs(np.subtract(g.identity_params(4 * f).skin, g.identity_params(4 * f + 5).skin)).sum()
                     for f in range(30)])
    assert same < 0.5 * other


def test_no_nuisance_images_of_one_identity_are_identical():
    g = SyntheticFaces(seed=0, nuisance=0.0)
    np.testing.assert_array_equal(g.render(3, 0), g.render(3, 1))


def test_identity_bound_is_checked():
    with pytest.raises(ToolchainError, match="out of range"):
        SyntheticFaces(seed=0, num_identities=4).render(4, 0)


def test_benchmark_split_and_pairs():
    b = SyntheticBenchmark(train_identities=10, images_per_identity=2, val_identities=8,
                           val_images_per_identity=3, pairs=40, family_size=4)
    assert b.val_offset == 12  # next family boundary after 10 training identities
    rows = b.pair_list()
    assert rows.shape == (40, 5)
    assert set(rows[:, 0]) | set(rows[:, 2]) <= set(range(12, 20))  # only held-out identities
    # 10 folds of 4: two matched then two mismatched
    np.testing.assert_array_equal(rows[:, 4], np.tile([1, 1, 0, 0], 10))
    same = rows[rows[:, 4] == 1]
    assert (same[:, 0] == same[:, 2]).all() and (same[:, 1] != same[:, 3]).all()
    diff = rows[rows[:, 4] == 0]
    assert (diff[:, 0] != diff[:, 2]).all()
    np.testing.assert_array_equal(rows, b.pair_list())  # deterministic
    pairs = b.verification_pairs()
    assert len(pairs) == 40 and pairs.images_a.shape == (40, 112, 112, 3)
    np.testing.assert_array_equal(pairs.images_a[0], b.generator().render(rows[0, 0], rows[0, 1]))


def test_default_benchmark_and_bad_settings():
    d = default_benchmark()
    assert d.train_identities > 0 and d.pairs % 20 == 0 and d.val_offset >= d.train_identities
    with pytest.raises(ToolchainError, match="multiple of 20"):
        SyntheticBenchmark(pairs=30)


def test_synthetic_identity_dataset():
    from toolchain.data import SyntheticIdentityDataset

    ds = SyntheticIdentityDataset(train_identities=3, images_per_identity=2, val_identities=4, pairs=20)
    assert len(ds) == 6 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 2, 2])
    x, y = ds[3]
    assert x.shape == (3, 112, 112) and str(x.dtype) == "torch.float32" and y == 1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    expected = SyntheticFaces(seed=0).render(1, 1)
    np.testing.assert_allclose(x.numpy(), (expected.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-6)
