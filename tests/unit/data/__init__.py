"""Single-process tests of `camex_ds.data`, one file per module."""
