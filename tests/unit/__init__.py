"""Single-process tests, one file per module of the package, at the package's path (tests/README.md)."""
