"""Single-process tests of `camex_ds.train`, one file per module."""
