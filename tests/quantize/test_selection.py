"""The fallback's stopping rule (toolchain.quantize.selection): the mean cosine's lower confidence
bound over the measuring images, the rare images int8 gets badly wrong set aside."""

import math

import numpy as np
import pytest

from toolchain.quantize.selection import (CONFIDENCE_Z, RANKING_IMAGES, SET_ASIDE, cosine_key, cosine_summary,
                                          drop_unneeded, forward_selection, noise_key, ranking_indices, ranking_key,
                                          ranks_on_all, targets_met)


def test_the_lower_bound_is_the_mean_less_z_standard_errors():
    cos = np.array([1.0, 0.99, 0.98, 0.97])
    s = cosine_summary(cos)  # 2% of 4 rounds to none set aside
    se = np.std(cos, ddof=1) / math.sqrt(4)
    assert s["cosine_mean"] == pytest.approx(0.985) and s["cosine_min"] == pytest.approx(0.97)
    assert s["cosine_mean_low"] == pytest.approx(0.985 - CONFIDENCE_Z * se) and s["set_aside"] == []
    # More images at the same spread: a tighter bound.
    assert cosine_summary(np.tile(cos, 10))["cosine_mean_low"] > s["cosine_mean_low"]
    assert cosine_summary(np.array([0.9995]))["cosine_mean_low"] == pytest.approx(0.9995)


def test_the_lowest_images_are_set_aside_and_listed():
    rng = np.random.default_rng(0)
    cos = 0.9991 + 0.0003 * rng.standard_normal(128)
    cos[[5, 77]] = [0.48, 0.58]  # two images int8 gets badly wrong, as SeesawFaceNet's identity images
    s = cosine_summary(cos)
    k = round(128 * SET_ASIDE)
    assert k == 3 and s["set_aside"] == sorted(cos)[:3] and s["set_aside"][:2] == [0.48, 0.58]
    kept = np.sort(cos)[3:]
    assert s["cosine_mean"] == pytest.approx(kept.mean()) and s["cosine_min"] == kept.min()
    assert targets_met(s, 0.999, 0.99)
    # Counted in, those two would hold both targets out of reach.
    assert cos.mean() < 0.999 and cos.min() < 0.99


def test_a_mean_above_the_target_with_a_wide_spread_does_not_meet_it():
    noise = np.random.default_rng(0).normal(0, 1, 32)
    noise = (noise - noise.mean()) / noise.std(ddof=1)
    wide, tight = cosine_summary(0.9991 + 0.0008 * noise), cosine_summary(0.9991 + 0.00002 * noise)
    assert wide["cosine_mean"] > 0.999 and tight["cosine_mean"] > 0.999
    assert not targets_met(wide, 0.999, None)
    assert targets_met(tight, 0.999, None)
    assert not targets_met(tight, 0.999, tight["cosine_min"] + 1e-6)
    assert targets_met(tight, None, tight["cosine_min"])


def test_ranking_images_spread_over_the_measuring_images():
    assert list(ranking_indices(128)) == list(range(0, 128, 4)) and len(ranking_indices(128)) == RANKING_IMAGES
    assert list(ranking_indices(20)) == list(range(20))
    assert len(ranking_indices(100)) == RANKING_IMAGES and ranking_indices(100)[-1] >= 90


def test_forward_selection_ranks_cheaply_and_stops_on_the_judged_bound():
    noise = np.random.default_rng(1).normal(0, 1, 64)
    noise = (noise - noise.mean()) / noise.std(ddof=1)
    sigma = 0.00012 * math.sqrt(64) / CONFIDENCE_Z  # the bound sits about 0.00012 below the mean
    gain = {"a": 0.00010, "b": 0.00009, "c": 0.00008, "d": 0.00001}
    ranked, judged = [], []

    def rank(names, key):  # a noisy ranking set that still orders the units right
        ranked.append(list(names))
        return {"cosine_mean": 0.99885 + sum(gain[n] for n in names) + 0.00001, "cosine_min": 0.995}

    def judge(names):
        judged.append(list(names))
        return cosine_summary(0.99885 + sum(gain[n] for n in names) + sigma * noise)

    all_int8 = {"layers": 0, **cosine_summary(0.99885 + sigma * noise)}
    got = forward_selection(list(gain), rank, judge, lambda c: targets_met(c, 0.999, None), 4, [all_int8], "test")
    # The judged mean crosses 0.999 with a and b (0.99904); its lower bound only with c as well.
    assert got["met"] and got["float_units"] == ["a", "b", "c"]
    assert got["trail"][2]["cosine_mean"] > 0.999 > got["trail"][2]["cosine_mean_low"]
    # The backward pass then tries the choice without c (its step gained least), b and a; the
    # choice without c is the second forward step, already judged, so only two sets are new.
    assert judged == [["a"], ["a", "b"], ["a", "b", "c"], ["a", "c"], ["b", "c"]] and len(ranked) == 4 + 3 + 2
    backward = got["trail"][4:]
    assert [t["removed"] for t in backward] == ["b", "a"] and not any(t["met"] for t in backward)
    # A candidate rank() refuses (over a size budget) is never chosen.
    got = forward_selection(list(gain), lambda names, key: None if "a" in names else rank(names, key), judge,
                            lambda c: targets_met(c, 0.999, None), 4, [], "test")
    assert "a" not in got["tried"]


def test_an_agreement_target_is_judged_on_the_score_noise_at_its_threshold():
    from toolchain.evaluate.flips import score_noise_at
    from toolchain.quantize.selection import embedding_summary

    rng = np.random.default_rng(0)
    f = rng.normal(size=(64, 16))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    e = f + rng.normal(0, 0.01, f.shape)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    plain = embedding_summary(e, f)
    assert "score_noise" not in plain and plain == cosine_summary(np.sum(e * f, axis=1))
    c = embedding_summary(e, f, {"score_threshold": 0.5, "max_score_noise": 1.0})
    assert c["score_noise"] == pytest.approx(score_noise_at(e, f, 0.5)) and c["score_noise"] > 0
    assert targets_met(c, 0.9, None, c["score_noise"])
    assert not targets_met(c, 0.9, None, c["score_noise"] * 0.99)
    assert not targets_met(c, 1.0, None, 1.0)  # the cosine targets still hold as before


def test_a_step_ranks_by_the_bound_the_choice_so_far_misses():
    cosine_ok = {"cosine_mean": 0.9995, "cosine_mean_low": 0.9994, "cosine_min": 0.995, "score_noise": 0.0066}
    assert ranking_key(cosine_ok, 0.999, 0.99) is noise_key  # only the agreement target is missed
    assert ranking_key({**cosine_ok, "cosine_mean_low": 0.9989}, 0.999, 0.99) is cosine_key
    assert ranking_key({**cosine_ok, "cosine_min": 0.98}, 0.999, 0.99) is cosine_key
    no_agreement = {k: v for k, v in cosine_ok.items() if k != "score_noise"}
    assert ranking_key(no_agreement, 0.999, 0.99) is cosine_key
    # "a" wins back more cosine, "b" quietens the scores at the threshold more (VarGFaceNet's
    # blocks do not order the same way by both).
    on_ranking = {"a": {"cosine_mean": 0.99952, "cosine_min": 0.996, "score_noise": 0.0062},
                  "b": {"cosine_mean": 0.99950, "cosine_min": 0.996, "score_noise": 0.0058}}
    noise = {"a": 0.0061, "b": 0.0057}

    keys = []

    def rank(names, key):  # the noise is ranked on all the measuring images, the cosine on 32
        keys.append(key)
        return {**on_ranking[names[-1]], "images": 128 if ranks_on_all(key) else 32}

    def judge(names):
        return {**cosine_ok, "score_noise": min(noise[n] for n in names) if names else cosine_ok["score_noise"]}

    def select(max_noise, cosine_target):
        met = lambda c: targets_met(c, cosine_target, None, max_noise)  # noqa: E731
        return forward_selection(["a", "b"], rank, judge, met, 2,
                                 [{"layers": 0, **judge([])}], "test",
                                 key_for=lambda judged: ranking_key(judged, cosine_target, None))

    assert select(0.0060, 0.999)["float_units"] == ["b"]
    assert keys == [noise_key, noise_key] and ranks_on_all(noise_key) and not ranks_on_all(cosine_key)
    # While the cosine target is the one missed, the cosine ranks: "a" first, then "b".
    got = select(0.0060, 0.99999)
    assert not got["met"] and got["tried"] == ["a", "b"]
    assert got["float_units"] == [] and "closest" not in got  # a cosine target missed: all int8
    # Without key_for, forward_selection ranks by the cosine as it always did.
    plain = forward_selection(["a", "b"], rank, judge,
                              lambda c: targets_met(c, 0.999, None, 0.0060), 1, [{"layers": 0, **judge([])}], "test")
    assert plain["tried"] == ["a"] and not plain["met"]


def test_short_of_the_agreement_target_alone_the_quietest_choice_is_kept():
    # As VarGFaceNet's .tflite at agreement_risk 0.01: the first step quietens the scores, the
    # second makes them noisier again, and the budget allows no third.
    cosine_ok = {"cosine_mean": 0.9995, "cosine_mean_low": 0.9994, "cosine_min": 0.995}
    noise = {(): 0.0063, ("b",): 0.0055, ("b", "a"): 0.0056}

    def rank(names, key):  # "b" ranks first, then "a"
        return {**cosine_ok, "score_noise": {"b": 0.0055, "a": 0.0058}[names[-1]]}

    def judge(names):
        return {**cosine_ok, "score_noise": noise.get(tuple(names), 0.0060)}

    def select(max_noise, cosine_target=0.999, table=None):
        if table:
            noise.update(table)
        met = lambda c: targets_met(c, cosine_target, None, max_noise)  # noqa: E731
        return forward_selection(["a", "b"], rank, judge, met, 2, [{"layers": 0, **judge([])}], "test",
                                 key_for=lambda judged: ranking_key(judged, cosine_target, None))

    got = select(0.0050)
    assert not got["met"] and got["tried"] == ["b", "a"]
    assert got["float_units"] == ["b"] and got["closest"]
    # Steps that only made the scores noisier than all int8 keep nothing.
    got = select(0.0050, table={("b",): 0.0064, ("b", "a"): 0.0065})
    assert got["float_units"] == [] and "closest" not in got
    # A step whose noise could not be read (NaN) is not a choice.
    got = select(0.0050, table={("b",): float("nan"), ("b", "a"): 0.0060})
    assert got["float_units"] == ["b", "a"] and got["closest"]
    # Missing a cosine target as well: all int8, as before.
    got = select(0.0050, cosine_target=0.9999, table={("b",): 0.0055, ("b", "a"): 0.0056})
    assert got["float_units"] == [] and not got["met"]


def test_the_backward_pass_puts_back_in_int8_what_later_units_made_unneeded():
    # "a" ranks first on the ranking images but does nothing once "b" and "c" are float; "d"
    # lowers the judged mean.
    def judged_mean(names):
        s = set(names)
        return 0.9985 + 0.0003 * ("b" in s) + 0.0003 * ("c" in s) + (0.0002 if s == {"a"} else 0) - 0.00001 * ("d" in s)

    def rank(names, key):
        order = {"a": 3, "d": 2, "b": 1, "c": 0}  # a misleading ranking subset
        return {"cosine_mean": 0.9985 + 0.0001 * sum(order[n] + 1 for n in names), "cosine_min": 0.995}

    def judge(names):
        m = judged_mean(names)
        return {"cosine_mean": m, "cosine_mean_low": m, "cosine_min": 0.995}

    met = lambda c: targets_met(c, 0.9990, None)  # noqa: E731
    trail = [{"layers": 0, **judge([])}]
    got = forward_selection(["a", "b", "c", "d"], rank, judge, met, 4, trail, "test")
    assert got["met"] and got["tried"] == ["a", "d", "b", "c"]
    assert got["float_units"] == ["b", "c"] and met(judge(got["float_units"]))
    backward = [t for t in trail if "removed" in t]
    # d (it lowered the mean) goes first, then a; b and c are each still needed.
    assert [(t["removed"], t["met"]) for t in backward] == [("d", True), ("a", True), ("b", False), ("c", False)]
    assert drop_unneeded(["b", "c"], judge, met, [trail[0]]) == ["b", "c"]


def _sized_selection(budget: int, sized: bool = True, max_steps: int = 4):
    """A large unit with the largest gain, and small ones that reach the target together: as
    SeesawFaceNet's `.tflite` at export seed 2, which took `features.9` (52 KB) and ran out of room."""
    gain = {"big": 0.0005, "s1": 0.00035, "s2": 0.00035, "s3": 0.00035}
    cost = {"big": 50_000, "s1": 5_000, "s2": 5_000, "s3": 5_000}
    base = 0.9985

    def summary(names):
        m = base + sum(gain[n] for n in names)
        return {"cosine_mean": m, "cosine_mean_low": m, "cosine_min": 0.995, "bytes": 1_000_000 + sum(cost[n] for n in names)}

    def rank(names, key):
        c = summary(names)
        return None if c["bytes"] - 1_000_000 > budget else c

    met = lambda c: targets_met(c, base + 0.0009, None)  # noqa: E731
    return forward_selection(list(gain), rank, summary, met, max_steps, [{"layers": 0, **summary([])}], "test",
                             sized=sized)


def test_out_of_room_a_second_pass_ranks_by_gain_per_byte():
    got = _sized_selection(57_000)
    # Largest gain first: big, then s1; s2 would pass the budget, and the two miss the target.
    assert got["tried"] == ["big", "s1"]
    # Per byte the small units come first, and three of them meet it in 15 KB.
    assert got["met"] and got["float_units"] == ["s1", "s2", "s3"]
    assert got["per_byte"] == {"tried": ["s1", "s2", "s3"], "met": True}
    second = [t for t in got["trail"] if t.get("pass") == "per byte"]
    assert [t.get("added") for t in second[:3]] == ["s1", "s2", "s3"]
    # The backward pass of the second choice is in the trail too: each small unit is needed.
    assert [(t["removed"], t["met"]) for t in second[3:]] == [("s1", False), ("s2", False)]


def test_without_sizes_or_a_refusal_there_is_no_second_pass():
    # Not sized: the first pass's miss stands (all int8), as before.
    got = _sized_selection(57_000, sized=False)
    assert not got["met"] and got["float_units"] == [] and "per_byte" not in got
    # Room for everything, but two steps allowed: missed for the steps, not the bytes.
    got = _sized_selection(10**6, max_steps=2)
    assert not got["met"] and got["tried"] == ["big", "s1"] and "per_byte" not in got
    # Room for two small units only: the second pass misses too, and the first pass's result
    # stands, with the second's rows in the trail.
    got = _sized_selection(12_000)
    assert not got["met"] and got["float_units"] == [] and got["per_byte"]["met"] is False
    assert any(t.get("pass") == "per byte" for t in got["trail"])


def test_gain_per_byte_skips_units_that_gain_nothing():
    from toolchain.quantize.selection import gain_per_byte

    table = {(): (0.9985, 100), ("a",): (0.9990, 600), ("b",): (0.9987, 100), ("c",): (0.9984, 101),
             ("d",): (0.9995, 10_100)}

    def rank(names, key):
        if tuple(names) == ("e",):
            return None
        m, size = table[tuple(names)]
        return {"cosine_mean": m, "cosine_min": 0.99, "bytes": size}

    # b gains 0.0002 for no bytes (counted as 1), a 0.0005 for 500, d 0.001 for 10,000; c loses.
    assert gain_per_byte(rank, [], ["a", "b", "c", "d"], cosine_key) == ("b", False)
    assert gain_per_byte(rank, [], ["a", "c", "d", "e"], cosine_key) == ("a", True)
    assert gain_per_byte(rank, [], ["c"], cosine_key) == (None, False)
