"""MIPIC trainer on Hugging Face transformers: Matryoshka sentence embeddings with
self-distilled attention / CKA alignment (via :mod:`mipic_kernels`), the progressive
chain, and the MRL, ESE and MIC baselines."""

from .config import Config, config_from_dict, load_config

__all__ = ["Config", "config_from_dict", "load_config"]
