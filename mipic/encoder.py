"""A Hugging Face backbone with every layer's hidden states, pooling, and saving.

Works with encoders (BERT, MiniLM, TinyBERT, XLM-R such as BGE-M3) and decoders (Qwen3,
Llama-like): decoders pool the last real token by default, encoders the [CLS] token,
unless the model folder carries a sentence-transformers pooling configuration.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

POOLING_FILE = "mipic.json"
_DECODER_TYPES = {"qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma", "gemma2", "gemma3", "gpt2", "phi3"}
_ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}


@dataclass
class Encoded:
    """Hidden states of every layer ``(L + 1, B, T, D)`` (0 = embeddings) and the mask ``(B, T)``."""

    hidden: tuple[torch.Tensor, ...]
    mask: torch.Tensor


def is_decoder(config) -> bool:
    """Whether a transformers config describes a causal (decoder-only) language model."""
    archs = getattr(config, "architectures", None) or []
    return (
        bool(getattr(config, "is_decoder", False))
        or any(a.endswith("ForCausalLM") for a in archs)
        or getattr(config, "model_type", "") in _DECODER_TYPES
    )


def default_pooling(name: str, config) -> str:
    """Pooling for ``auto``: a saved choice, else sentence-transformers', else by architecture."""
    folder = Path(name)
    saved = folder / POOLING_FILE
    if saved.is_file():
        return json.loads(saved.read_text())["pooling"]
    st_pooling = folder / "1_Pooling" / "config.json"
    if st_pooling.is_file():
        modes = json.loads(st_pooling.read_text())
        for key, mode in _ST_POOLING.items():
            if modes.get(key):
                return mode
    return "last" if is_decoder(config) else "cls"


def query_positions(mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """The token each example pools from (and attends from): the last real one for
    ``last`` (either padding side), else position 0. ``(B,)`` int64."""
    if pooling == "last":
        positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
        return torch.where(mask, positions, torch.full_like(positions, -1)).amax(-1)
    return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pooled ``(*, B, D)`` from ``hidden (*, B, T, D)`` and ``mask (B, T)``."""
    if pooling == "mean":
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(-2) / weights.sum(-2).clamp(min=1)
    index = query_positions(mask, pooling)
    rows = torch.arange(mask.shape[0], device=mask.device)
    return hidden[..., rows, index, :]


class Encoder(nn.Module):
    """A transformers backbone, its tokenizer and a pooling rule."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, max_length: int) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "last"):
            raise ValueError(f"pooling must be 'cls', 'mean' or 'last'; got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, name: str, pooling: str = "auto", max_length: int = 64) -> "Encoder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModel.from_pretrained(name, config=config)
        except OSError as err:
            offline = " (HF_HUB_OFFLINE is set: only local folders and cached models load)" if os.environ.get(
                "HF_HUB_OFFLINE") else ""
            raise ValueError(f"model.name {name!r} is neither a loadable local folder nor a reachable hub model"
                             f"{offline}: {err}") from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if pooling == "auto":
            pooling = default_pooling(name, config)
        return cls(model, tokenizer, pooling, max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, texts: Sequence[str]) -> Encoded:
        batch = self.tokenize(texts)
        out = self.model(**batch, output_hidden_states=True, return_dict=True)
        return Encoded(tuple(out.hidden_states), batch["attention_mask"].bool())

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, mask, self.pooling)

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], batch_size: int = 64, layers: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """Pooled float32 embeddings ``(len(layers), N, D)`` (default: the last layer only)."""
        layers = [self.num_layers] if layers is None else list(layers)
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for start in range(0, len(texts), batch_size):
                enc = self(texts[start:start + batch_size])
                stacked = torch.stack([enc.hidden[l] for l in layers])
                chunks.append(self.pool(stacked, enc.mask).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks, dim=1)

    def save(self, folder: str | Path, dims: Sequence[int]) -> None:
        """A folder that ``transformers.AutoModel`` and ``SentenceTransformer`` both load;
        ``mipic.json`` and the sentence-transformers config record the Matryoshka widths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        meta = {"pooling": self.pooling, "matryoshka_dims": list(dims), "max_length": self.max_length}
        (folder / POOLING_FILE).write_text(json.dumps(meta, indent=2))
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}, indent=2))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": self.hidden_size,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_lasttoken": self.pooling == "last",
        }
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
        st_config = {"similarity_fn_name": "cosine", "matryoshka_dims": list(dims)}
        (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
