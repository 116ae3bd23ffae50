"""The conformance suite: checks any implementation against the oracle (``hardtovary.reference``).

Modules: ``targets`` (PROTOCOL, ``module:attribute`` loading, Adapter, built-in ``reference`` target),
``strategies`` (hypothesis strategies), ``checks`` (the check registry ``CHECKS``), ``tolerances`` (per-dtype
policy), ``xfails`` (expected-failures files), ``runner`` (verdicts), ``report`` (table + JSON), ``cli``
(``main(argv)``, ``add_arguments(parser)``), ``pytest_plugin`` and ``mutants`` (the suite's teeth).
"""
