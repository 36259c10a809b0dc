"""Scripts the multi-process tests start as modules (`python -m tests.dist.<name>`, `deepspeed --module`)."""
