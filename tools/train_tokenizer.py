#!/usr/bin/env python
"""`python tools/train_tokenizer.py ...` (kept for existing users and docs): the
`camex-train-tokenizer` command (camex_ds.cli.tokenizer)."""
import sys

from camex_ds.cli.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
