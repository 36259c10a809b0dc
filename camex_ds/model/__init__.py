"""The decoder (`gpt.py`) and what training needs to know about its parameters (`optim.py`)."""
from .gpt import GPT, Block, ModelOutput, build_model, save_config
from .optim import apply_lr_scales, param_groups

__all__ = ["GPT", "Block", "ModelOutput", "apply_lr_scales", "build_model", "param_groups", "save_config"]
