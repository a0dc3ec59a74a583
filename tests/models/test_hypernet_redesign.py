"""The redesign's per-user trunk modulation (film) and cohort score normalisation: both fold
into a plain verifier, and the model declares its per-user tensors."""

from __future__ import annotations

import pytest
import torch

from toolchain.models.hypernet import B2, FILM_SCALE, W2, HyperNetwork
from toolchain.models.verifier import Verifier


def _hypernet(film: bool, cohort: int = 0) -> HyperNetwork:
    torch.manual_seed(0)
    hn = HyperNetwork(16, code_dim=8, encoder_hidden=16, rank=2, verifier_kwargs={"film": film}, cohort_size=cohort)
    with torch.no_grad():
        for p in hn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hn.eval()


def test_verifier_declares_per_user_tensors():
    plain, film = Verifier(), Verifier(film=True)
    assert plain.per_user_tensors() == ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    assert film.per_user_tensors()[:2] == ["features.12.weight", "features.12.bias"]
    assert set(film.per_user_tensors()) <= set(film.state_dict())
    assert isinstance(film.last_conv, torch.nn.Conv2d) and film.last_conv.out_channels == film.feature_dim


@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("cohort", [0, 12])
def test_built_verifier_equals_batched_scoring(film, cohort):
    hn = _hypernet(film, cohort)
    if cohort:
        hn.set_cohort(torch.randn(cohort, 3, 112, 112))
    x = torch.randn(6, 3, 112, 112)
    with torch.no_grad():
        theta = hn(torch.randn(3, 16))
        matrix = hn.score_matrix(theta, hn.features(x))
        for user in range(3):
            one = {k: v[user] for k, v in theta.items()}
            verifier = hn.build_verifier(one)
            assert torch.allclose(verifier(x)[:, 0], matrix[user], atol=1e-4)
            aligned = hn.score_pairs({k: v[[user] * 6] for k, v in theta.items()}, hn.features(x))
            assert torch.allclose(aligned, matrix[user], atol=1e-5)
    assert (FILM_SCALE in theta) == film


def test_film_makes_the_last_conv_per_user():
    hn = _hypernet(film=True)
    with torch.no_grad():
        theta = hn(torch.randn(2, 16))
    a = hn.verifier_state_dict({k: v[0] for k, v in theta.items()})
    b = hn.verifier_state_dict({k: v[1] for k, v in theta.items()})
    per_user = Verifier(film=True).per_user_tensors()
    for name in a:
        assert torch.equal(a[name], b[name]) == (name not in per_user), name


def test_cohort_normalisation_standardises_each_user_on_the_cohort():
    hn = _hypernet(film=True, cohort=32)
    cohort = torch.randn(32, 3, 112, 112)
    with torch.no_grad():
        raw = hn(torch.randn(4, 16))  # cohort not set yet: no normalisation
        hn.set_cohort(cohort)
        theta = hn(torch.randn(4, 16))
        scores = hn.score_matrix(theta, hn.features(cohort))
    # standardised, then the learned global affine map (the same for every user)
    scale, offset = float(hn.cohort_scale), float(hn.cohort_offset)
    assert torch.allclose(scores.mean(1), torch.full((4,), offset), atol=1e-4)
    assert torch.allclose(scores.std(1), torch.full((4,), abs(scale)), atol=1e-3)
    assert not torch.allclose(raw[W2], theta[W2]) and theta[B2].shape == raw[B2].shape
    with pytest.raises(ValueError, match="cohort needs"):
        hn.set_cohort(cohort[:5])


def test_old_checkpoints_without_the_new_switches_still_load():
    hn = HyperNetwork(16, code_dim=8, encoder_hidden=16, rank=2)
    state = hn.state_dict()
    assert not any(k.startswith(("gen_film", "cohort")) for k in state)
    HyperNetwork(16, code_dim=8, encoder_hidden=16, rank=2).load_state_dict(state)
