"""Checkpoints and model files: the consolidated format (`format`), DeepSpeed's on-disk layout (`deepspeed`) and
optimizer files (`optimizer`), consolidate and reshard (`convert`), upcycle and fold (`upcycle`), and Hugging
Face import and export (`hf`). Import from the module that does the job."""
