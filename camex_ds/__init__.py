"""camex_ds: expert-parallel DeepSpeed training of MoE language models with curvature-aware merging (CAMEx)."""
from .config import ConfigError, ModelConfig, MoEConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "__version__"]
