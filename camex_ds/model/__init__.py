"""The decoder (`gpt.py`) and what training needs to know about its parameters (`optim.py`)."""
from .gpt import GPT, Block, ModelOutput, build_model, save_config
from .optim import param_groups

__all__ = ["GPT", "Block", "ModelOutput", "build_model", "param_groups", "save_config"]
