"""The fallback's stopping rule: the mean cosine's lower confidence bound, not the measured mean."""

import math

import numpy as np
import pytest

from toolchain.quantize.selection import CONFIDENCE_Z, cosine_summary, forward_selection, targets_met


def test_the_lower_bound_is_the_mean_less_z_standard_errors():
    cos = np.array([1.0, 0.99, 0.98, 0.97])
    s = cosine_summary(cos)
    se = np.std(cos, ddof=1) / math.sqrt(4)
    assert s["cosine_mean"] == pytest.approx(0.985) and s["cosine_min"] == pytest.approx(0.97)
    assert s["cosine_mean_low"] == pytest.approx(0.985 - CONFIDENCE_Z * se)
    # More images at the same spread: a tighter bound.
    assert cosine_summary(np.tile(cos, 25))["cosine_mean_low"] > s["cosine_mean_low"]
    assert cosine_summary(np.array([0.9995]))["cosine_mean_low"] == pytest.approx(0.9995)


def test_a_mean_above_the_target_with_a_wide_spread_does_not_meet_it():
    noise = np.random.default_rng(0).normal(0, 1, 32)
    noise = (noise - noise.mean()) / noise.std(ddof=1)
    wide, tight = cosine_summary(0.9991 + 0.0008 * noise), cosine_summary(0.9991 + 0.00002 * noise)
    assert wide["cosine_mean"] > 0.999 and tight["cosine_mean"] > 0.999
    assert not targets_met(wide, 0.999, None)
    assert targets_met(tight, 0.999, None)
    assert not targets_met(tight, 0.999, tight["cosine_min"] + 1e-6)
    assert targets_met(tight, None, tight["cosine_min"])
    # A summary from before the bound existed is judged on its mean.
    assert targets_met({"cosine_mean": 0.9991, "cosine_min": 0.99}, 0.999, 0.99)


def test_forward_selection_goes_on_until_the_bound_holds():
    noise = np.random.default_rng(1).normal(0, 1, 64)
    noise = (noise - noise.mean()) / noise.std(ddof=1)
    sigma = 0.00012 * math.sqrt(64) / CONFIDENCE_Z  # the bound sits 0.00012 below the mean
    # Each float unit raises the mean by 0.0001: 0.99895, 0.99905, 0.99915. The measured mean
    # crosses 0.999 at the second unit, its lower bound only at the third.

    def measure(names):
        return cosine_summary(0.99885 + 0.0001 * len(names) + sigma * noise)

    got = forward_selection(["a", "b", "c", "d"], measure, lambda c: targets_met(c, 0.999, None), 4, [], "test")
    assert got["met"] and len(got["float_units"]) == 3
    assert got["trail"][1]["cosine_mean"] > 0.999 > got["trail"][1]["cosine_mean_low"]
    assert got["trail"][2]["cosine_mean_low"] == pytest.approx(0.99903)
