"""Single-process tests of `camex_ds.ckpt`, one file per module."""
