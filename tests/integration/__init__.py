"""Multi-rank and multi-process runs: DeepSpeed jobs, the launcher and the tools end to end (tests/README.md)."""
