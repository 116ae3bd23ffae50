"""reference.rules.RuleSpec: what it accepts and refuses (a table derived by hand from the documented argument rules
of ``aggregate``), its defaults, equality and hashing, the keep threshold against a brute-force count, and that
every backend's ``aggregate`` takes a spec and decides exactly as the spec does."""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hardtovary.accel import rules as A
from hardtovary.accel.torch import rules as T
from hardtovary.reference import rules as R
from hardtovary.reference.rules import RuleSpec

NOISY = 2 * 0.8 - 1  # 0.6000000000000001

# (rule, tau, flavour, k) -> the resolved (tau, flavour, k), or (error type, start of the message). Derived from the
# argument rules: flavour only for geometric_mean (default "paper"), k only for sand_mask (a real > 0, default 10),
# tau a real in [0, 1] (default 0 for and_mask / sand_mask, 1 for geometric_mean), mean takes tau None or 0 only,
# the paper geometric mean tau 1 only; the name first, then flavour's and k's applicability, the flavour's value,
# tau, the paper's unanimity, k's value.
ACCEPTED = [
    (("mean", None, None, None), (0.0, None, None)),
    (("mean", 0, None, None), (0.0, None, None)),
    (("mean", 0.0, None, None), (0.0, None, None)),
    (("mean", -0.0, None, None), (0.0, None, None)),
    (("and_mask", None, None, None), (0.0, None, None)),
    (("and_mask", 0.5, None, None), (0.5, None, None)),
    (("and_mask", 1, None, None), (1.0, None, None)),
    (("and_mask", NOISY, None, None), (0.6000000000000001, None, None)),
    (("and_mask", np.float32(0.25), None, None), (0.25, None, None)),
    (("geometric_mean", None, None, None), (1.0, "paper", None)),
    (("geometric_mean", 1, "paper", None), (1.0, "paper", None)),
    (("geometric_mean", None, "original", None), (1.0, "original", None)),
    (("geometric_mean", 0.5, "original", None), (0.5, "original", None)),
    (("geometric_mean", 0.0, "original", None), (0.0, "original", None)),
    (("sand_mask", None, None, None), (0.0, None, 10.0)),
    (("sand_mask", 0.3, None, 3), (0.3, None, 3.0)),
    (("sand_mask", 1.0, None, 1e-3), (1.0, None, 1e-3)),
]

REFUSED = [
    (("median", None, None, None),
     (ValueError, "rule must be one of ['and_mask', 'geometric_mean', 'mean', 'sand_mask'], got 'median'")),
    ((None, 0.5, None, None), (ValueError, "rule must be one of")),
    (("mean", 0.5, None, None),
     (ValueError, "tau must be None or 0 for rule='mean' (use rule='and_mask' for tau > 0), got tau=0.5")),
    (("mean", 1, None, None), (ValueError, "tau must be None or 0 for rule='mean'")),
    (("mean", 1.5, None, None), (ValueError, "tau must lie in [0.0, 1.0], got 1.5")),
    (("mean", True, None, None), (TypeError, "tau must be a real number, got bool True")),
    (("mean", None, "paper", None),
     (ValueError, "flavour applies only to rule='geometric_mean', got flavour='paper' with rule='mean'")),
    (("mean", None, None, 3.0), (ValueError, "k applies only to rule='sand_mask', got k=3.0 with rule='mean'")),
    (("mean", 0.5, "paper", None), (ValueError, "flavour applies only")),  # flavour before tau
    (("and_mask", -0.1, None, None), (ValueError, "tau must lie in [0.0, 1.0], got -0.1")),
    (("and_mask", "0.5", None, None), (TypeError, "tau must be a real number, got str '0.5'")),
    (("and_mask", math.nan, None, None), (ValueError, "tau must be finite, got nan")),
    (("and_mask", 0.5, "original", None), (ValueError, "flavour applies only to rule='geometric_mean'")),
    (("and_mask", 0.5, None, 10), (ValueError, "k applies only to rule='sand_mask', got k=10 with rule='and_mask'")),
    (("and_mask", 2.0, "paper", 10), (ValueError, "flavour applies only")),  # flavour before k before tau
    (("and_mask", 2.0, None, 10), (ValueError, "k applies only")),
    (("geometric_mean", 0.5, None, None),
     (ValueError, ("tau must be None or 1 for flavour='paper': the paper defines the geometric mean of gradients "
                   "only when all K signs agree (paper §2.3 (i)); got tau=0.5. Use flavour='original'"))),
    (("geometric_mean", 0, "paper", None), (ValueError, "tau must be None or 1 for flavour='paper'")),
    (("geometric_mean", None, "bogus", None),
     (ValueError, "flavour must be one of ['original', 'paper'], got 'bogus'")),
    (("geometric_mean", 2.0, "bogus", None), (ValueError, "flavour must be one of")),  # flavour value before tau
    (("geometric_mean", 2.0, "original", None), (ValueError, "tau must lie in [0.0, 1.0]")),
    (("geometric_mean", None, None, 10), (ValueError, "k applies only to rule='sand_mask'")),
    (("sand_mask", None, "paper", None), (ValueError, "flavour applies only to rule='geometric_mean'")),
    (("sand_mask", 0.3, None, 0.0), (ValueError, "k must be > 0, got 0.0")),
    (("sand_mask", 0.3, None, -1), (ValueError, "k must be > 0, got -1.0")),
    (("sand_mask", 0.3, None, True), (TypeError, "k must be a real number, got bool True")),
    (("sand_mask", 0.3, None, math.inf), (ValueError, "k must be finite, got inf")),
    (("sand_mask", 2.0, None, -1), (ValueError, "tau must lie in [0.0, 1.0]")),  # tau before k
]


@pytest.mark.parametrize("options, resolved", ACCEPTED, ids=repr)
def test_rule_spec_resolves_the_defaults(options, resolved):
    spec = RuleSpec(*options)
    assert (spec.rule, spec.tau, spec.flavour, spec.k) == (options[0], *resolved)
    assert type(spec.tau) is float and (spec.k is None or type(spec.k) is float)


@pytest.mark.parametrize("options, refusal", REFUSED, ids=repr)
def test_rule_spec_refuses_with_the_options_name(options, refusal):
    error, message = refusal
    with pytest.raises(error) as caught:
        RuleSpec(*options)
    assert str(caught.value).startswith(message)


def _outcome(aggregate, *args, **kwargs):
    """``aggregate(*args, **kwargs)`` as ``(error type, message)`` or ``("ok", values and masks as float64)``."""
    try:
        values, masks = aggregate(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return "ok", [np.asarray(x, dtype=np.float64) for x in values + masks]


@pytest.mark.parametrize("options", [o for o, _ in ACCEPTED + REFUSED], ids=repr)
def test_every_backend_decides_as_the_spec_and_computes_the_same_with_a_spec(options):
    """The keyword form of each backend's aggregate refuses what RuleSpec refuses, with the same message, and
    otherwise computes exactly what the spec form computes."""
    rule, tau, flavour, k = options
    G = np.random.default_rng(7).standard_normal((5, 3, 2))
    keywords = {"rule": rule, "tau": tau, "flavour": flavour, "k": k}
    backends = [(R.aggregate, G), (A.aggregate, G), (T.aggregate, torch.from_numpy(G))]
    try:
        spec = RuleSpec(*options)
    except (TypeError, ValueError) as exc:
        for aggregate, g in backends:
            assert _outcome(aggregate, [g], rescale=True, **keywords) == (type(exc), str(exc))
        return
    for aggregate, g in backends:
        status, by_keywords = _outcome(aggregate, [g], rescale=True, **keywords)
        assert status == "ok", by_keywords
        assert _outcome(aggregate, [g], spec, rescale=True)[0] == "ok"
        for a, b in zip(by_keywords, _outcome(aggregate, [g], spec, rescale=True)[1]):
            np.testing.assert_array_equal(a, b)


def test_equal_options_give_equal_hashable_specs():
    assert RuleSpec("geometric_mean") == RuleSpec("geometric_mean", 1.0, "paper") == RuleSpec("geometric_mean", 1)
    assert RuleSpec("mean") == RuleSpec("mean", 0) == RuleSpec("mean", -0.0)
    assert RuleSpec("sand_mask") == RuleSpec("sand_mask", 0, None, 10)
    assert RuleSpec("and_mask", 0.5) != RuleSpec("and_mask", NOISY) != RuleSpec("geometric_mean", NOISY, "original")
    specs = {RuleSpec("geometric_mean"), RuleSpec("geometric_mean", 1.0, "paper"), RuleSpec("mean"),
             RuleSpec("mean", 0), RuleSpec("sand_mask"), RuleSpec("sand_mask", k=10.0), RuleSpec("and_mask")}
    assert len(specs) == 4  # and_mask at tau 0 computes what mean does, but is another rule
    assert {RuleSpec("geometric_mean"): 1}[RuleSpec("geometric_mean", 1, "paper")] == 1


def test_a_spec_is_frozen_and_replace_validates_again():
    spec = RuleSpec("geometric_mean", 0.5, "original")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.tau = 0.7
    assert dataclasses.replace(spec, tau=0.25) == RuleSpec("geometric_mean", 0.25, "original")
    with pytest.raises(ValueError, match="flavour='paper'"):
        dataclasses.replace(spec, flavour="paper")


def test_the_spec_and_the_keywords_are_one_or_the_other():
    G = np.ones((2, 3))
    spec = RuleSpec("and_mask", 0.5)
    for aggregate, g in ((R.aggregate, G), (A.aggregate, G), (T.aggregate, torch.from_numpy(G))):
        with pytest.raises(TypeError, match="either as a RuleSpec or as rule=..."):
            aggregate([g], spec, rule="and_mask")
        with pytest.raises(TypeError, match="either as a RuleSpec"):
            aggregate([g], spec, tau=0.5)
        with pytest.raises(TypeError, match="spec must be a RuleSpec, got str 'and_mask'"):
            aggregate([g], "and_mask")
        with pytest.raises(TypeError, match="rescale must be a bool"):
            aggregate([g], spec, rescale=1)
        with pytest.raises(ValueError, match="rule must be one of"):  # several bad arguments: the name first,
            aggregate([g], rule="median", tau=2.0, rescale=1)
        with pytest.raises(TypeError, match="rescale must be a bool"):  # then rescale, then the options
            aggregate([g], rule="and_mask", tau=2.0, rescale=1)
    assert R.aggregate_arguments(spec=spec, rescale=True) == (spec, True)
    assert R.aggregate_arguments("mean", 0) == (RuleSpec("mean"), False)


def test_rule_options_drop_tau_for_the_mean_only():
    assert R.rule_options("mean", 0.7, None, None) == {}
    assert R.rule_options("and_mask", 0.7) == {"tau": 0.7}
    assert R.rule_options("geometric_mean", 1.0, "paper") == {"tau": 1.0, "flavour": "paper"}
    assert R.rule_options("sand_mask", 0.3, None, 4.0) == {"tau": 0.3, "k": 4.0}
    assert R.rule_options("median", 0.3) == {"tau": 0.3}  # validates nothing: RuleSpec refuses the name


# ----------------------------------------------------------------------------------------------------------------
# The keep threshold against a brute-force count
# ----------------------------------------------------------------------------------------------------------------


def brute_threshold(intended: Fraction, K: int) -> int:
    """The smallest |S| in 0..K with |S| >= intended * K, on exact rationals."""
    return next(s for s in range(K + 1) if Fraction(s) >= intended * K)


def noisy_floats(q: Fraction):
    """``float(q)`` and its two neighbours on each side: the float noise a computed tau can carry."""
    x = float(q)
    below = np.nextafter(x, 0.0)
    above = np.nextafter(x, 1.0)
    return [t for t in (np.nextafter(below, 0.0), below, x, above, np.nextafter(above, 1.0)) if 0.0 <= t <= 1.0]


def intended_taus(K: int):
    """Every tie j/K and every midpoint (2j - 1)/(2K)."""
    return [Fraction(j, K) for j in range(K + 1)] + [Fraction(2 * j - 1, 2 * K) for j in range(1, K + 1)]


@pytest.mark.parametrize("K", range(1, 17))
def test_threshold_matches_a_brute_force_count_on_ties_and_float_noise(K):
    for intended in intended_taus(K):
        for tau in noisy_floats(intended):
            expected = brute_threshold(intended, K)
            assert R.agreement_threshold_count(float(tau), K) == expected, (K, intended, tau)
            assert RuleSpec("and_mask", float(tau)).threshold(K) == expected
            assert RuleSpec("sand_mask", float(tau)).threshold(K) == expected
            assert RuleSpec("geometric_mean", float(tau), "original").threshold(K) == expected
    assert RuleSpec("geometric_mean").threshold(K) == K  # the paper's geometric mean: unanimity only
    assert RuleSpec("mean").threshold(K) == 0


@pytest.mark.parametrize("tau, intended", [(2 * 0.8 - 1, Fraction(3, 5)), (0.1 * 3, Fraction(3, 10)),
                                           (1 - 0.7, Fraction(3, 10)), (0.1 + 0.2, Fraction(3, 10)),
                                           (0.7 + 0.1, Fraction(4, 5)), (1 / 3, Fraction(1, 3)),
                                           (2 / 3, Fraction(2, 3)), (0.9 - 0.4, Fraction(1, 2))])
def test_threshold_keeps_ties_of_computed_taus(tau, intended):
    for K in range(1, 17):
        assert RuleSpec("and_mask", tau).threshold(K) == brute_threshold(intended, K), (tau, K)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 8, 10, 16])
def test_every_backend_keeps_exactly_the_brute_force_ties(K):
    """Stacks with p positive, q negative and K - p - q zero environments, one column per (p, q): each backend's
    AND-mask keeps the columns with |p - q| >= the brute-force threshold, at every tie tau = j/K (with noise)."""
    pairs = [(p, q) for p in range(K + 1) for q in range(K + 1 - p)]
    G = np.zeros((K, len(pairs)))
    for column, (p, q) in enumerate(pairs):
        G[:p, column] = 1.5
        G[p:p + q, column] = -0.5
    for j in range(K + 1):
        for tau in noisy_floats(Fraction(j, K)):
            spec = RuleSpec("and_mask", float(tau))
            want = [abs(p - q) >= j for p, q in pairs]
            assert R.aggregate([G], spec)[1][0].tolist() == want
            assert A.aggregate([G.astype(np.float32)], spec)[1][0].tolist() == want
            assert T.aggregate([torch.from_numpy(G).to(torch.bfloat16)], spec)[1][0].tolist() == want


def test_the_geometric_mean_functions_take_their_options_through_the_spec():
    """The standalone geometric mean and its mask (oracle and torch) validate flavour and tau as RuleSpec does:
    None is the paper flavour and tau 1, the paper flavour refuses another tau."""
    G = np.array([[1.0, 2.0, -1.0, 0.0], [4.0, 0.5, 2.0, 3.0]])
    for M, g in ((R, G), (T, torch.from_numpy(G))):
        for function in (M.geometric_mean, M.geometric_mean_mask):
            assert np.asarray(function(g, flavour=None)).tolist() == np.asarray(function(g)).tolist()
            with pytest.raises(ValueError, match=r"tau must be None or 1 for flavour='paper'"):
                function(g, tau=0.5)
            with pytest.raises(ValueError, match=r"flavour must be one of \['original', 'paper'\], got 'bogus'"):
                function(g, flavour="bogus")
        assert np.asarray(M.geometric_mean(g, flavour=None)).tolist() == [2.0, 1.0, 0.0, 0.0]  # sqrt(1*4), sqrt(2*.5)
