"""``python -m hardtovary`` runs the command line."""

from hardtovary.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
