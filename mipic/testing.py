"""Tiny transformers models built from a config (no download), for tests and examples."""

from __future__ import annotations

import string
from pathlib import Path

WORDS = (
    "a the man woman dog cat is are was playing running eating riding horse guitar food street "
    "child children two people sitting on in with and of to red blue big small car park ball "
    "water beach jumps walks black white young old group table talking reading book"
).split()


def build_tiny_model(folder, kind: str = "bert") -> str:
    """Save a randomly initialised tiny model and a word-level tokenizer to ``folder``.

    ``kind="bert"``: 3 layers, width 32 (an encoder); ``"qwen"``: a 2-layer, width-32
    Qwen3 (a decoder). The weights are the same on every call. Returns the folder.
    """
    import torch
    from transformers import BertTokenizerFast

    if kind not in ("bert", "qwen"):
        raise ValueError(f"kind must be 'bert' or 'qwen'; got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.ascii_lowercase, ".", ","]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # Positional: the first parameter is vocab_file in transformers 4 and vocab (which takes
    # a path) in 5, where a vocab_file keyword is ignored and leaves only the special tokens.
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)
    with torch.random.fork_rng():  # fixed weights without touching the caller's RNG
        torch.manual_seed(0)
        model = _tiny_model(kind, len(vocab))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _tiny_model(kind: str, vocab_size: int):
    from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

    if kind == "bert":
        return BertModel(BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        ))
    return Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=48, max_position_embeddings=64,
        architectures=["Qwen3ForCausalLM"], pad_token_id=0,
    ))
