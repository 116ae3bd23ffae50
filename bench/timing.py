"""Wall-clock timing shared by the CPU benchmarks (imported as a sibling module: ``python bench/<name>.py``)."""

import time


def best_time(fn, repeats: int) -> float:
    """The best of ``repeats`` wall times of ``fn()``, in seconds: the least disturbed run on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
