"""The paper's experiments and the command line."""
