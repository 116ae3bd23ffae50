"""The edge cases of the aggregation rules, and the outcome the oracle defines for each: one table, as data.

Public implementations of the AND-mask and its relatives disagree exactly here: all gradients zero, one environment,
ties ``|S| = tau K``, exact zeros, one environment at zero, a fully masked tensor, underflow, subnormals, float16,
NaN/inf. This table is the single description of those cases. It drives the conformance suite's ``agg.special.*``
checks (and the tie of ``agg.ties.exact``), the parity test of every backend (``tests/test_edge_case_parity.py``)
and the table in ``docs/conventions.md`` (:func:`markdown_table`, which a test keeps identical to the docs). The
oracle's own tests (``tests/test_rules.py``) check the outcomes by independent, hand-derived routes.

Each :class:`EdgeCase` names its inputs (one or more gradient lists ``[G_0, G_1, ...]``, each stack ``[K, *shape]``)
and the options to run them with: every registered rule variant (:func:`hardtovary.reference.rules.variant_names`,
or the ones listed, in that order) at each tau
in ``taus`` (taken as 0 for the mean and 1 for the paper geometric mean) and each rescaling choice. ``judge`` says how
an implementation's outputs are judged: ``"oracle"`` (against the oracle's values and masks), ``"float16"`` (also the
same masks as float64 input of the same values) or ``"nonfinite"`` (refused, or non-finite where the bad entry is;
``finite_twin`` is the same input with finite values, which must be accepted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .rules import variant_names


@dataclass(frozen=True)
class EdgeCase:
    name: str
    title: str
    outcome: str
    inputs: tuple = field(repr=False)
    taus: tuple = (0.0, 0.5, 1.0)
    rescales: tuple = (False, True)
    #: rule variants (``rule`` or ``rule.flavour``) in the order to run them; None: every registered one
    rules: tuple | None = None
    #: rule variants left out of ``rules=None`` (the mean has no masked component to test, for instance)
    skip_rules: tuple = ()
    judge: str = "oracle"
    finite_twin: tuple | None = field(default=None, repr=False)
    #: the conformance check this case belongs to
    check: str = ""

    def check_id(self) -> str:
        return self.check or f"agg.special.{self.name}"

    def rule_variants(self) -> tuple[str, ...]:
        """The rule variants this case runs (rules registered after the table was written included)."""
        if self.rules is not None:
            return self.rules
        return tuple(v for v in variant_names() if v not in self.skip_rules)


def _float16_stack() -> np.ndarray:
    rng = np.random.default_rng(16)
    G16 = (rng.standard_normal((5, 3, 4)) * 10.0 ** rng.integers(-3, 2, (5, 3, 4))).astype(np.float16)
    G16[1, 0, :2] = 0
    return G16


def _underflow_float32() -> np.ndarray:
    G = np.full((16, 6), 1e-3, dtype=np.float32)
    G[:, 3:] *= -1
    return G


def _subnormal_float32() -> np.ndarray:
    """Columns whose signs agree only if a subnormal entry counts; the last column is subnormal throughout."""
    tiny = np.finfo(np.float32).tiny  # the smallest normal float32, 1.18e-38
    G = np.array([[tiny / 2, -1e-3, 2e-3, tiny / 4],
                  [1e-3, -tiny / 8, 1e-3, tiny / 2],
                  [2e-3, -2e-3, -tiny / 2, tiny / 8],
                  [1e-3, -1e-3, 1e-3, tiny / 4]])
    return G.astype(np.float32)


def _nonfinite_inputs() -> tuple:
    inputs = []
    for bad in (np.nan, np.inf, -np.inf):
        G = _FINITE_TWIN.copy()
        G[1, 1] = bad
        inputs.append((f"{bad} in environment 1", (G,)))
    return tuple(inputs)


_FINITE_TWIN = np.array([[1.0, 2.0, 3.0], [1.0, 5.0, 2.0], [2.0, 1.0, 1.0]])

EDGE_CASES: tuple[EdgeCase, ...] = (
    EdgeCase(
        "all_zeros", "all gradients 0 (K = 3 and K = 1), every rule/tau/rescale",
        "Output exactly 0 for every rule. The AND-mask keeps everything at tau = 0 (|S| = 0 >= 0) and masks "
        "everything above; rescaling leaves 0 at 0; the SAND-mask's variance is 0 and A = 0 is not above tau.",
        (("all zeros K=3", (np.zeros((3, 4)),)), ("all zeros K=1", (np.zeros((1, 2, 2)),)))),
    EdgeCase(
        "k1", "K = 1 with an exact zero: identity at tau = 0, zeros masked and x4/3 rescaled above",
        "One environment: at tau = 0 the AND-mask is the identity; above, the exact zero is masked (|S| = 0) and "
        "every nonzero entry kept, so rescaling multiplies the three kept entries by 4/3. Paper geometric mean: the "
        "identity. Original: |g| + 1e-10 with g's sign. SAND-mask: the spread of one sample is 0, so the mask is 1 "
        "where A > tau.",
        (("K=1 with one zero of 4", (np.array([[1.5, -2.0, 0.0, 3.0]]),)),)),
    EdgeCase(
        "identical", "identical gradients in every environment (tau = 1 and 0.5)",
        "All four environments agree: the AND-mask and both geometric means return the gradient; the SAND-mask's "
        "variance is 0 and its mask is its limit, 1 if A > tau else 0 (0 at tau = 1: never DomainBed's 1e-17).",
        (("identical gradients", (np.tile(np.array([1.0, -2.0, 0.5, 3.0]), (4, 1)),)),), taus=(1.0, 0.5)),
    EdgeCase(
        "exact_zeros", "exact zeros count as sign 0 (threshold form, not count form)",
        "sign(0) = 0 in S: with signs (+, +, 0, 0) and tau = 0.5 the threshold form keeps (|S| = 2 >= 2), where the "
        "count form \"at least 3 of 4 agree\" would drop.",
        (("exact zeros", (np.array([[1.0, 1.0, 1.0, -1.0, 2.0],
                                    [2.0, 0.0, 3.0, 0.0, 1.0],
                                    [0.0, -1.0, 0.5, 0.0, -1.0],
                                    [0.0, 0.0, 0.0, 0.0, 0.0]]),)),),
        taus=(0.25, 0.5, 0.75, 1.0)),
    EdgeCase(
        "partial_agreement", "3 of 4 signs agree (+,-,+,+): paper GM 0, and_mask kept iff tau <= 1/2",
        "Signs (+, -, +, +): |S| = 2, so the AND-mask keeps iff tau <= 1/2; the paper geometric mean needs all K "
        "signs and gives 0; the original flavour keeps it with the sign of the mean where the AND-mask does.",
        (("partial agreement", (np.array([[1.0, 2.0, -1.0], [2.0, -1.0, -3.0], [4.0, 3.0, -2.0],
                                          [0.5, 1.0, -1.0]]),)),),
        taus=(0.5, 0.75, 1.0)),
    EdgeCase(
        "one_env_zero", "gradients (1, 2, 0): paper GM 0, original GM ~5.8e-4",
        "Gradients (1, 2, 0): the AND-mask keeps iff tau <= 2/3; the paper geometric mean is 0 (a zero sign); the "
        "original flavour gives (1 * 2 * 1e-10)^(1/3) ~ 5.848e-4 where the AND-mask keeps, 0 above.",
        (("(1, 2, 0)", (np.array([[1.0, 1.0], [2.0, 2.0], [0.0, 3.0]]),)),), taus=(0.5, 2 / 3, 1.0)),
    EdgeCase(
        "fully_masked", "a fully masked tensor, rescaled, is exactly 0 (never inf/NaN)",
        "A tensor where every component disagrees is fully masked at tau = 1: rescaled, it stays exactly 0, never "
        "inf or NaN (paper footnote 14), while the other tensor of the model is rescaled on its own.",
        (("fully masked tensor", (np.array([[1.0, -1.0, 2.0], [-1.0, 1.0, -2.0]]),
                                  np.array([[1.0, 2.0], [3.0, -1.0]]))),),
        taus=(1.0,), rescales=(True, False), skip_rules=("mean",)),
    EdgeCase(
        "per_tensor_rescale", "rescaling uses each tensor's own kept fraction",
        "Rescaling is per parameter tensor: 3 of 4 kept multiplies by 4/3, 1 of 2 kept by 2; never one factor for "
        "the whole model.",
        (("two tensors, rescaled", (np.array([[1.0, 2.0, -1.0, 4.0], [1.0, 1.0, 1.0, 2.0], [2.0, 5.0, -3.0, 1.0]]),
                                    np.array([[1.0, -2.0], [2.0, 1.0], [1.0, 1.0]]))),),
        taus=(1.0,), rescales=(True,), skip_rules=("mean",)),
    EdgeCase(
        "underflow", "K = 16, |g| = 1e-3 in float32 (and 1e-20 in float64): GM must not underflow",
        "K = 16 gradients of magnitude 1e-3 in float32: the geometric mean is 1e-3, computed in the log domain "
        "(exp(sum log)^(1/K) underflows to 0 in float32); likewise 1e-20 in float64.",
        (("K=16 |g|=1e-3 float32", (_underflow_float32(),)), ("K=16 |g|=1e-20 float64", (np.full((16, 3), 1e-20),))),
        taus=(1.0,), rescales=(False,), rules=("geometric_mean.paper", "geometric_mean.original", "and_mask", "mean")),
    EdgeCase(
        "subnormal", "subnormal float32 gradients (|g| < 1.2e-38) count by their sign",
        "A subnormal gradient is a nonzero number: its sign counts in S and its logarithm in the paper geometric "
        "mean (about -88.5 for 1.2e-38 / 2). A GPU kernel compiled to flush subnormals to zero (CuPy's -ftz=true) "
        "counts it as 0 unless it reads the sign from the bits.",
        (("subnormal float32", (_subnormal_float32(),)),), taus=(0.5, 1.0)),
    EdgeCase(
        "float16", "float16 input: oracle values, same masks as float64 input of the same values",
        "float16 gradients are accepted and computed as float64 holding the same values: the masks are those of the "
        "float64 input, and the values are returned in float16 within its tolerance.",
        (("float16", (_float16_stack(),)),), taus=(0.0, 0.6, 1.0), judge="float16"),
    EdgeCase(
        "nonfinite", "NaN/inf in one environment: refused (ValueError or FloatingPointError) while the finite twin is "
        "accepted, or non-finite at that component (never finite)",
        "NaN or inf in one environment: the oracle refuses it (ValueError naming the argument and the first bad "
        "entry). An implementation may refuse it too, or return a non-finite value there; a finite value would "
        "silently drop it.",
        _nonfinite_inputs(), taus=(1.0,), judge="nonfinite", finite_twin=(_FINITE_TWIN,)),
    EdgeCase(
        "tie", "the tie (+,+,+,-) at tau = 0.5",
        "Ties are kept (the paper's >=): signs (+, +, +, -) have |S| = 2 = ceil(0.5 * 4), so the AND-mask keeps them; "
        "the SAND-mask drops them (tanh 0 = 0).",
        (("(+,+,+,-) tau=0.5", (np.array([[1.0], [2.0], [0.5], [-1.0]]),)),),
        taus=(0.5,), rescales=(False,), rules=("and_mask",), check="agg.ties.exact"),
)

BY_NAME = {case.name: case for case in EDGE_CASES}


def markdown_table() -> str:
    """The table of edge cases and outcomes, as ``docs/conventions.md`` shows it."""
    def cell(text: str) -> str:  # a bare '|' (as in |S|) would split the cell
        return text.replace("|", "\\|")

    rows = ["| case | what the oracle defines |", "|---|---|"]
    rows += [f"| `{c.name}`: {cell(c.title)} | {cell(c.outcome)} |" for c in EDGE_CASES]
    return "\n".join(rows)
