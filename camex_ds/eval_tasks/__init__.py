"""lm-evaluation-harness task definitions over local files (no Hub access): pass this folder to lm-eval's
`--include_path` (docs/hf.md shows the command)."""
