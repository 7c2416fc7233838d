"""A Hugging Face backbone with every layer's hidden states, pooling, and saving.

Works with encoders (BERT, MiniLM, TinyBERT, XLM-R such as BGE-M3) and decoders (Qwen3,
Llama-like): decoders pool the last real token by default, encoders the [CLS] token,
unless the model folder carries a sentence-transformers pooling configuration.

A base model that is a sentence-transformers pipeline keeps what it adds around the
backbone when it is saved again: its modules after pooling that leave the embedding
space as it is (Normalize), its inference length (``max_seq_length``), lower-casing and
prompts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

POOLING_FILE = "mipic.json"
_DECODER_TYPES = {"qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma", "gemma2", "gemma3", "gpt2", "phi3"}
_ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}
_ST_MODULES = "modules.json"
_ST_CONFIG = "config_sentence_transformers.json"
_ST_TRANSFORMER_CONFIG = "sentence_bert_config.json"
# Modules after pooling that a saved pipeline keeps: they leave the Matryoshka prefixes
# meaningful. Others (Dense, ...) map the trained pooled output somewhere else.
_KEPT_MODULE_TYPES = ("Normalize",)
# Without a recorded inference length, a backbone is used up to this many tokens at most.
_FALLBACK_LENGTH = 512


@dataclass
class Encoded:
    """Hidden states of every layer ``(L + 1, B, T, D)`` (0 = embeddings) and the mask ``(B, T)``.

    On request also: ``words (B, T)`` the tokenizer's word id of each token (-1 for
    special and padding tokens) and ``offsets (B, T, 2)`` each token's character range in
    its text as given (``tokens=True``); ``attentions``, one ``(B, heads, T, T)`` tensor
    per layer (``attentions[l - 1]`` is layer ``l``; ``attentions=True``).
    """

    hidden: tuple[torch.Tensor, ...]
    mask: torch.Tensor
    words: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class Pipeline:
    """What a sentence-transformers folder adds around the backbone."""

    # ``max_seq_length`` used at inference; None = the backbone's own limit.
    max_seq_length: Optional[int] = None
    do_lower_case: bool = False
    # modules.json entries after Pooling that saving keeps, and the folders they came from.
    modules: list[dict] = field(default_factory=list)
    module_folders: dict[str, Path] = field(default_factory=dict)
    # config_sentence_transformers.json (prompts, similarity function, ...).
    config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, name: str) -> "Pipeline":
        """The pipeline of a local folder or hub model; empty for a plain transformers model."""
        pipeline = cls()
        bert_config = _read_json(name, _ST_TRANSFORMER_CONFIG)
        pipeline.max_seq_length = bert_config.get("max_seq_length")
        pipeline.do_lower_case = bool(bert_config.get("do_lower_case", False))
        pipeline.config = _read_json(name, _ST_CONFIG)
        modules = _read_json(name, _ST_MODULES, default=[])
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        after_pooling = kinds.index("Pooling") + 1 if "Pooling" in kinds else len(kinds)
        for module, kind in zip(modules[after_pooling:], kinds[after_pooling:]):
            if kind in _KEPT_MODULE_TYPES:
                pipeline.modules.append(module)
                if Path(name, module.get("path", "")).is_dir() and module.get("path"):
                    pipeline.module_folders[module["path"]] = Path(name, module["path"])
            else:
                warnings.warn(
                    f"{name}: the {kind} module after pooling is not kept in the saved model: the "
                    "Matryoshka widths are trained on the pooled output, which it would transform",
                    stacklevel=2,
                )
        return pipeline


def _read_json(name: str, filename: str, default=None):
    """A JSON file of a local model folder or a (cached) hub model; ``default`` or ``{}``
    when it has none."""
    path: Optional[Path] = Path(name, filename)
    if not Path(name).is_dir():
        from transformers.utils import cached_file

        found = cached_file(name, filename, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
        path = Path(found) if found else None
    if path is None or not path.is_file():
        return {} if default is None else default
    return json.loads(path.read_text())


def load_model_config(name: str, what: str = "model"):
    """The transformers config of ``name``, or a ValueError that calls it ``what``
    and says where it was looked for."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except OSError as err:
        raise ValueError(_not_loadable(name, what, err)) from err


def _not_loadable(name: str, what: str, err: Exception) -> str:
    folder = Path(name).resolve()
    where = (f"{folder} is not a model folder" if folder.is_dir()
             else f"there is no folder {folder}")
    offline = " and HF_HUB_OFFLINE is set, so only models in the local cache load" if os.environ.get(
        "HF_HUB_OFFLINE") else ", and no hub model of that name could be reached"
    return f"{what} {name!r} cannot be loaded: {where}{offline} ({str(err).splitlines()[0]})"


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
    """A transformers backbone, its tokenizer, a pooling rule, the length texts are cut to,
    and the sentence-transformers pipeline it came with."""

    def __init__(
        self, model: nn.Module, tokenizer, pooling: str, max_length: int, pipeline: Optional[Pipeline] = None,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "last"):
            raise ValueError(f"pooling must be 'cls', 'mean' or 'last'; got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.pipeline = pipeline or Pipeline()

    @classmethod
    def from_pretrained(
        cls, name: str, pooling: str = "auto", max_length: Optional[int] = None, *, what: str = "model",
        num_layers: Optional[int] = None, attn_implementation: Optional[str] = None,
    ) -> "Encoder":
        """Load a local folder or hub model. ``max_length`` None cuts texts at the model's
        inference length (its sentence-transformers ``max_seq_length``, else the limit of
        its tokenizer and position embeddings). ``what`` names ``name`` in errors.

        ``num_layers`` keeps only the model's first layers (a smaller model made from the
        bottom of a larger one: the embeddings and layers ``1 .. num_layers`` load their
        pretrained weights, the others are not built). ``attn_implementation`` is passed to
        transformers (``"eager"`` returns attention weights; the default SDPA does not)."""
        from transformers import AutoModel, AutoTokenizer

        config = load_model_config(name, what)
        if num_layers is not None:
            have = int(config.num_hidden_layers)
            if not 1 <= num_layers <= have:
                raise ValueError(f"{what}: num_layers must be in [1, {have}] (the model has {have} layers); "
                                 f"got {num_layers}")
            config.num_hidden_layers = num_layers
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            with _quiet_loading(num_layers is not None):  # the weights of the layers left out are unused
                model = AutoModel.from_pretrained(name, config=config, **extra)
        except OSError as err:
            raise ValueError(_not_loadable(name, what, err)) from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if pooling == "auto":
            pooling = default_pooling(name, config)
        pipeline = Pipeline.read(name)
        if max_length is None:
            max_length = pipeline.max_seq_length or _backbone_limit(config, tokenizer)
        return cls(model, tokenizer, pooling, max_length, pipeline)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _seen(self, texts: Sequence[str]) -> list[str]:
        """The texts as the tokenizer sees them (lower-cased where the pipeline says so)."""
        return [t.lower() for t in texts] if self.pipeline.do_lower_case else list(texts)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            self._seen(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, texts: Sequence[str], *, tokens: bool = False, attentions: bool = False) -> Encoded:
        """Every layer's hidden states of ``texts``; ``tokens`` adds the word ids and
        character offsets (into ``texts``) of the tokens (a fast tokenizer is needed),
        ``attentions`` the attention weights of every layer (the model switches to eager
        attention, the only implementation that returns them)."""
        words = offsets = None
        if not tokens:
            batch = self.tokenize(texts)
        else:
            if not getattr(self.tokenizer, "is_fast", False):
                raise ValueError(f"token offsets need a fast tokenizer; {type(self.tokenizer).__name__} is not one")
            seen = self._seen(texts)
            encoding = self.tokenizer(seen, padding=True, truncation=True, max_length=self.max_length,
                                      return_tensors="pt", return_offsets_mapping=True)
            offsets = torch.tensor([_offsets_in(text, seen_text, rows) for text, seen_text, rows
                                    in zip(texts, seen, encoding.pop("offset_mapping").tolist())],
                                   dtype=torch.long).reshape(-1, encoding["input_ids"].shape[1], 2).to(self.device)
            words = torch.tensor([[-1 if w is None else w for w in encoding.word_ids(i)] for i in range(len(seen))],
                                 dtype=torch.long).reshape(offsets.shape[:2]).to(self.device)
            batch = {k: v.to(self.device) for k, v in encoding.items()}
        if attentions and self.model.config._attn_implementation != "eager":
            if not hasattr(self.model, "set_attn_implementation"):  # older transformers cannot switch a loaded model
                raise ValueError("attention weights need the model loaded with attn_implementation='eager'")
            self.model.set_attn_implementation("eager")
        out = self.model(**batch, output_hidden_states=True, output_attentions=attentions, return_dict=True)
        return Encoded(tuple(out.hidden_states), batch["attention_mask"].bool(), words, offsets,
                       tuple(out.attentions) if attentions else None)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, mask, self.pooling)

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], batch_size: int = 64, layers: Optional[Sequence[int]] = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Pooled float32 embeddings ``(len(layers), N, D)`` (default: the last layer only),
        in the order of ``texts``. Batches are formed from texts of similar length, so that
        little of each is padding; ``progress`` shows a bar on stderr."""
        layers = [self.num_layers] if layers is None else list(layers)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        chunks = []
        bar = _progress_bar(len(texts), "encode") if progress else None
        try:
            for start in range(0, len(texts), batch_size):
                enc = self([texts[i] for i in order[start:start + batch_size]])
                stacked = torch.stack([enc.hidden[l] for l in layers])
                chunks.append(self.pool(stacked, enc.mask).float().cpu())
                if bar is not None:
                    bar.update(enc.mask.shape[0])
        finally:
            self.train(was_training)
            if bar is not None:
                bar.close()
        if not chunks:
            return torch.empty(len(layers), 0, self.hidden_size)
        sorted_embeddings = torch.cat(chunks, dim=1)
        embeddings = torch.empty_like(sorted_embeddings)
        embeddings[:, order] = sorted_embeddings
        return embeddings

    def save(self, folder: str | Path, dims: Sequence[int], state_dict: Optional[dict] = None) -> None:
        """A folder that ``transformers.AutoModel`` and ``SentenceTransformer`` both load;
        ``mipic.json`` and the sentence-transformers config record the Matryoshka widths.
        The base model's pipeline (Normalize, inference length, prompts) is kept.
        ``state_dict``: the weights to write instead of the model's own (the gathered
        full weights of a sharded model)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, state_dict=state_dict)
        self.tokenizer.save_pretrained(folder)
        meta = {"pooling": self.pooling, "matryoshka_dims": list(dims), "train_max_length": self.max_length}
        (folder / POOLING_FILE).write_text(json.dumps(meta, indent=2))
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        for idx, module in enumerate(self.pipeline.modules, start=len(modules)):
            modules.append({**module, "idx": idx, "name": str(idx)})
            source = self.pipeline.module_folders.get(module.get("path", ""))
            if source is not None and source.resolve() != (folder / module["path"]).resolve():
                shutil.copytree(source, folder / module["path"], dirs_exist_ok=True)
        (folder / _ST_MODULES).write_text(json.dumps(modules, indent=2))
        (folder / _ST_TRANSFORMER_CONFIG).write_text(json.dumps(
            {"max_seq_length": self.pipeline.max_seq_length, "do_lower_case": self.pipeline.do_lower_case},
            indent=2))
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
        st_config = {"similarity_fn_name": "cosine", **self.pipeline.config, "matryoshka_dims": list(dims)}
        (folder / _ST_CONFIG).write_text(json.dumps(st_config, indent=2))


@contextlib.contextmanager
def _quiet_loading(quiet: bool):
    """transformers' report of unused weights silenced while ``quiet``."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _offsets_in(text: str, seen: str, offsets: list[list[int]]) -> list[list[int]]:
    """Character ranges in ``seen`` (``text`` lower-cased) as ranges in ``text``: the same
    unless lower-casing changed the length (a few Unicode letters, e.g. 'İ')."""
    if len(seen) == len(text):
        return offsets
    position = [i for i, c in enumerate(text) for _ in c.lower()] + [len(text)]
    return [[position[s], position[e - 1] + 1] if e > s else [0, 0] for s, e in offsets]


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=" texts", dynamic_ncols=True)


def _backbone_limit(config, tokenizer) -> int:
    """The longest input the tokenizer and the position embeddings both accept."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    usable = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(usable) if usable else _FALLBACK_LENGTH
