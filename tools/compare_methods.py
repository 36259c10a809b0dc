#!/usr/bin/env python
"""`python tools/compare_methods.py ...`: the `camex-compare` command (camex_ds.cli.compare), for users and docs
that run it here."""
import sys

from camex_ds.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
