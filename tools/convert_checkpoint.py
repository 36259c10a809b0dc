#!/usr/bin/env python
"""`python tools/convert_checkpoint.py ...` (kept for existing users and docs): the
`camex-convert` command (camex_ds.cli.convert)."""
import sys

from camex_ds.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
