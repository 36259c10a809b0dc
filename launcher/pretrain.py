#!/usr/bin/env python
"""`deepspeed launcher/pretrain.py ...`, the command users know: camex_ds.cli.pretrain (`camex-pretrain`), whose
--help lists the flags."""
import sys

from camex_ds.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
