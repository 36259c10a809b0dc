"""Single-process tests of `camex_ds.moe`, one file per module."""
