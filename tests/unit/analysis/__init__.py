"""Single-process tests of `camex_ds.analysis`, one file per module."""
