"""Checkpoints and model files: the consolidated format (`format`), DeepSpeed's on-disk layout (`deepspeed`) and
optimizer files (`optimizer`), consolidate and reshard (`convert`), upcycle and fold (`upcycle`), and Hugging
Face import and export (`hf`; models no stock architecture computes get their own modeling code: `hf_remote`, which
copies `hf_modeling/` into the folder). Import from the module that does the job."""
