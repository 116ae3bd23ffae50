"""hardtovary: the AND-mask, the geometric mean of per-environment gradients and Invariant Learning Consistency.

Subpackages:

- :mod:`hardtovary.reference` -- the spec oracle in plain NumPy/SciPy.
- :mod:`hardtovary.accel` -- the same math, fast (CuPy on a GPU, NumPy otherwise; PyTorch implementations).
- :mod:`hardtovary.conformance` -- checks any implementation against the oracle.
- :mod:`hardtovary.experiments` -- the paper's experiments and the command line.
"""

__version__ = "0.1.0"
