"""The spec oracle: plain NumPy and SciPy, no autograd. Every formula cites the paper."""
