"""accel/quadratic.py: batched exact inconsistency scores equal reference.quadratic per problem."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hardtovary.accel import quadratic as AQ
from hardtovary.accel.backend import cupy_status
from hardtovary.reference import quadratic as RQ

CUPY_OK, CUPY_REASON = cupy_status()


@st.composite
def diagonal_problems(draw):
    N, K, P = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    lams = draw(hnp.arrays(np.float64, (N, K, P), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 1e-3, 7.5])))
    offsets = draw(st.none() | hnp.arrays(np.float64, (N, K), elements=st.sampled_from([0.0, 0.0, 1.0, -0.25, 3.0])))
    return lams, offsets


@settings(max_examples=80, deadline=None)
@given(problems=diagonal_problems(), eps=st.sampled_from([1e-3, 0.1, 1.0, 5.0]))
def test_diagonal_scores_equal_the_reference(problems, eps):
    lams, offsets = problems
    got = AQ.inconsistency_scores_diagonal(lams, eps, offsets)
    assert got.shape == (lams.shape[0],) and got.dtype == np.float64
    for n in range(lams.shape[0]):
        want = RQ.inconsistency_score_diagonal(lams[n], eps, None if offsets is None else offsets[n]).value
        assert got[n] == pytest.approx(want, rel=1e-13, abs=0) if np.isfinite(want) else got[n] == want


@st.composite
def spd_problems(draw):
    N, K, P = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    A = draw(hnp.arrays(np.float64, (N, K, P, P), elements=st.floats(-3, 3, allow_subnormal=False)))
    shift = draw(st.sampled_from([1e-2, 0.1, 1.0]))
    H = A @ np.swapaxes(A, -1, -2) + shift * np.eye(P)
    return H


@settings(max_examples=60, deadline=None)
@given(H=spd_problems(), eps=st.sampled_from([1e-2, 0.5, 2.0]))
def test_spd_scores_equal_the_reference(H, eps):
    got = AQ.inconsistency_scores(H, eps)
    assert got.shape == (H.shape[0],)
    for n in range(H.shape[0]):
        want = RQ.inconsistency_score(RQ.QuadraticProblem(H[n]), eps).value
        assert got[n] == pytest.approx(want, rel=1e-8)


def test_spd_scores_in_several_blocks(monkeypatch):
    monkeypatch.setattr(AQ, "BLOCK_ELEMENTS", 100)
    rng = np.random.default_rng(0)
    A = rng.standard_normal((7, 3, 4, 4))
    H = A @ np.swapaxes(A, -1, -2) + 0.1 * np.eye(4)
    lams = rng.random((7, 3, 4))
    np.testing.assert_allclose(AQ.inconsistency_scores(H, 0.2),
                               [RQ.inconsistency_score(RQ.QuadraticProblem(h), 0.2).value for h in H], rtol=1e-9)
    np.testing.assert_allclose(AQ.inconsistency_scores_diagonal(lams, 0.2),
                               [RQ.inconsistency_score_diagonal(x, 0.2).value for x in lams], rtol=1e-13)


def test_diagonal_conventions():
    lams = np.array([[[1.0, 0.0], [2.0, 0.0]],      # 0/0 -> 0: finite, eps * 2
                     [[1.0, 0.0], [1.0, 1.0]],      # x/0 -> inf
                     [[0.0, 0.0], [0.0, 0.0]]])     # H = 0 everywhere: 0
    np.testing.assert_array_equal(AQ.inconsistency_scores_diagonal(lams, 0.5), [1.0, np.inf, 0.0])
    # K = 1 gives eps; offsets enter as max(|delta|, |delta + eps kappa|)
    np.testing.assert_array_equal(AQ.inconsistency_scores_diagonal(np.ones((1, 1, 3)), 0.25), [0.25])
    got = AQ.inconsistency_scores_diagonal(np.ones((1, 2, 1)), 0.25, np.array([[0.0, -1.0]]))
    assert got[0] == pytest.approx(1.25)


@pytest.mark.parametrize("bad,kind", [(np.diag([1.0, 0.0, 2.0]), "singular"), (np.diag([1.0, -1.0, 2.0]), "indefinite"),
                                      (np.diag([1.0, 1e-14, 2.0]), "singular")])
def test_singular_or_indefinite_hessians_are_refused_pointing_to_the_reference(bad, kind):
    H = np.stack([np.eye(3), np.eye(3)])[None].repeat(2, axis=0)
    H[1, 1] = bad
    with pytest.raises(ValueError, match=rf"H\[1, 1\] is {kind}.*reference\.quadratic\.inconsistency_score"):
        AQ.inconsistency_scores(H, 0.1)


def test_bad_input():
    with pytest.raises(ValueError, match="symmetric"):
        AQ.inconsistency_scores(np.array([[[[1.0, 0.5], [0.0, 1.0]]]]), 0.1)
    with pytest.raises(ValueError, match=r"shape \[N, K, P, P\]"):
        AQ.inconsistency_scores(np.ones((2, 2, 2)), 0.1)
    with pytest.raises(ValueError, match="eps"):
        AQ.inconsistency_scores_diagonal(np.ones((1, 1, 1)), 0.0)
    with pytest.raises(ValueError, match=r"lams\[0, 1, 0\] = -1"):
        AQ.inconsistency_scores_diagonal(np.array([[[1.0], [-1.0]]]), 0.1)
    with pytest.raises(ValueError, match="finite"):
        AQ.inconsistency_scores_diagonal(np.array([[[np.nan]]]), 0.1)
    with pytest.raises(ValueError, match="offsets"):
        AQ.inconsistency_scores_diagonal(np.ones((2, 3, 1)), 0.1, np.zeros((2, 2)))
    with pytest.raises(TypeError):
        AQ.inconsistency_scores_diagonal(np.ones((1, 1, 1), dtype=bool), 0.1)


@pytest.mark.skipif(not CUPY_OK, reason=CUPY_REASON)
def test_cupy_scores_equal_numpy():
    import cupy

    rng = np.random.default_rng(1)
    A = rng.standard_normal((20, 3, 4, 4))
    H = A @ np.swapaxes(A, -1, -2) + 0.1 * np.eye(4)
    lams = rng.random((20, 3, 4)) * (rng.random((20, 3, 4)) > 0.2)
    np.testing.assert_allclose(cupy.asnumpy(AQ.inconsistency_scores(cupy.asarray(H), 0.3)),
                               AQ.inconsistency_scores(H, 0.3), rtol=1e-9)
    np.testing.assert_array_equal(cupy.asnumpy(AQ.inconsistency_scores_diagonal(cupy.asarray(lams), 0.3)),
                                  AQ.inconsistency_scores_diagonal(lams, 0.3))
