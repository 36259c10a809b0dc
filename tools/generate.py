#!/usr/bin/env python
"""`python tools/generate.py ...` (kept for existing users and docs): the
`camex-generate` command (camex_ds.cli.generate)."""
import sys

from camex_ds.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
