"""The conformance suite: checks any implementation against the oracle."""
