#!/usr/bin/env python
"""`python tools/curvature_study.py ...`: the `camex-study` command (camex_ds.cli.study), issue 24's curvature
study in one command."""
import sys

from camex_ds.cli.study import main

if __name__ == "__main__":
    sys.exit(main())
