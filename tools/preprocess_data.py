#!/usr/bin/env python
"""`python tools/preprocess_data.py ...` (kept for existing users and docs): the
`camex-preprocess` command (camex_ds.cli.preprocess)."""
import sys

from camex_ds.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
