"""Single-process tests of `camex_ds.cli`: the console scripts and their tools/*.py wrappers."""
