"""The Hugging Face modeling code that `camex-convert export-hf` copies into a folder (`trust_remote_code=True`).

`configuration_camex.py` and `modeling_camex.py` import only torch and transformers, never camex_ds, so the exported
folder works where camex_ds is not installed; camex_ds itself never imports them (`camex_ds.ckpt.hf_remote` copies
the files).
"""
