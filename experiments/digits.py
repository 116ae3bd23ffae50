"""The 8x8 handwritten digits of scikit-learn as a data set of the memorization experiments (paper §3.2, Figs. 8, 9,
16, run at a CPU's scale by ``hardtovary cifar10 --dataset digits``).

scikit-learn ships the 1797 images inside its wheel (``sklearn.datasets.load_digits``: the UCI "optical recognition
of handwritten digits" test set, 8x8 grey levels 0..16, classes 0..9 about equally frequent), so they need no
download: a real-image data set on which Figs. 8, 9 and 16 run in minutes on a CPU where CIFAR-10 is out of reach.

What this module fixes, where CIFAR-10 has an official layout to follow:

- **Split.** One fixed split for every run: the permutation of the 1797 indices drawn by
  ``numpy.random.default_rng(SPLIT_SEED)`` (seed 0), its first 1438 indices (80%) the training set and the other
  359 the test set. The split does not follow a trial's ``--seed``, so all seeds of a run are judged on the same
  test images; the seed draws the labels, the initialisation and the batch order, as for CIFAR-10.
- **Normalisation.** ``(x / 16 - MEAN) / STD`` with the mean and standard deviation of all 1797 images' pixels on
  the [0, 1] scale (0.3053 and 0.3760): one channel, one pair of constants, the counterpart of CIFAR-10's
  per-channel ImageNet constants. Fixed numbers rather than statistics of each split, so that a run's inputs do not
  depend on which images it holds.
"""

from __future__ import annotations

import numpy as np

from hardtovary.experiments.errors import UsageError
from hardtovary.experiments.options import install_hint

__all__ = ["load_digits", "N_IMAGES", "N_TRAIN", "SPLIT_SEED", "MEAN", "STD"]

N_IMAGES = 1797
#: 80% of the images train, the rest test (1438 / 359).
N_TRAIN = 1438
SPLIT_SEED = 0
#: Mean and standard deviation of all 1797 images' pixels divided by 16 (tests/test_digits.py recomputes them).
MEAN = 0.3053
STD = 0.3760
NUM_CLASSES = 10
MAX_LEVEL = 16.0


def _sklearn_digits():
    """``(images [1797, 8, 8] float64 in 0..16, target [1797] int64)`` from scikit-learn, or a UsageError naming the
    extra to install."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise UsageError("the digits data set comes with scikit-learn, which is not installed; "
                         f"{install_hint('digits')}") from None
    bunch = sklearn_load_digits()
    return bunch.images, bunch.target


def load_digits(*, n_train: int | None = None, n_test: int | None = None):
    """The digits as a :class:`hardtovary.experiments.cifar10.CIFAR10`-shaped record (the fields the memorization
    experiments read): ``X_*`` float32 ``[N, 1, 8, 8]`` normalised, ``y_*`` int64 ``[N]``, ``classes`` ``("0",
    .., "9")``. The fixed split of the module docstring; ``n_train`` / ``n_test`` keep the first examples of each
    part only (quick runs)."""
    from hardtovary.experiments.cifar10 import CIFAR10

    for name, value, limit in (("n_train", n_train, N_TRAIN), ("n_test", n_test, N_IMAGES - N_TRAIN)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise UsageError(f"{name} must be an integer in 1..{limit} (the digits' fixed split) or None, "
                             f"got {value!r}")
    images, target = _sklearn_digits()
    x = ((images.astype(np.float32) / np.float32(MAX_LEVEL) - np.float32(MEAN)) / np.float32(STD))[:, None]
    order = np.random.default_rng(SPLIT_SEED).permutation(N_IMAGES)
    train, test = order[:N_TRAIN][:n_train], order[N_TRAIN:][:n_test]
    y = target.astype(np.int64)
    return CIFAR10(x[train], y[train], x[test], y[test], tuple(str(c) for c in range(NUM_CLASSES)))
