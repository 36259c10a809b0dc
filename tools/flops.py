#!/usr/bin/env python
"""`python tools/flops.py ...`: the `camex-flops` command (camex_ds.cli.flops), for users and docs that run it here."""
import sys

from camex_ds.cli.flops import main

if __name__ == "__main__":
    sys.exit(main())
