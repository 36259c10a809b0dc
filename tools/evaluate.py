#!/usr/bin/env python
"""`python tools/evaluate.py ...` (kept for existing users and docs): the
`camex-evaluate` command (camex_ds.cli.evaluate)."""
import sys

from camex_ds.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
