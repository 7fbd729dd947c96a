"""Checkpoint conversion between HuggingFace/PyTorch and mashvlm_jax.

param_map.py     the one two-way name table (HF name <-> params path + layout transform)
safetensors_io   lazy one-tensor-at-a-time reading (single/sharded), sharded writing
hf_import.py     HF CLIP + LLaMA checkpoints -> params tree (``mashvlm import-hf``)
torch_export.py  params tree -> HF-loadable directories (``mashvlm export-torch``)
params_io.py     the Orbax checkpoint contract with the trainer (save_params / load_params)

Importing this package imports neither jax nor torch.
"""
