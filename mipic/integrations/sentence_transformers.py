"""``MIPICLoss``: MIPIC's relational terms added to any sentence-transformers loss.

A modifier loss in the style of ``MatryoshkaLoss``: it runs the encoder once per input
column with every layer's hidden states, lets the base loss reuse those outputs (no
second forward), and adds the relational terms computed from the token states, the
attention mask and the layers, every width and layer in one call per term. It returns a
dict of named components, which ``SentenceTransformerTrainer`` sums and logs one by one.

Why it must wrap ``MatryoshkaLoss`` and not the other way round: ``MatryoshkaLoss`` calls
its inner loss once per width with the model's outputs re-sliced and re-normalised to
that width. A relational loss already covers every width in one call, so inside
``MatryoshkaLoss`` it would be computed once per width (``len(dims)`` times the work and
the weight) on outputs whose sentence embeddings were truncated for another width.
Nesting it there raises a ``ValueError``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..objectives.relational import RelationalLoss
from ..objectives.terms import EncodedBatch
from ..distributed import average_gradients_across_ranks, is_distributed

COLUMNS = ("all", "anchor")
_ST_POOLINGS = {"cls": "cls", "mean": "mean", "lasttoken": "last"}


class MIPICLoss(nn.Module):
    """``base_loss + sum of weighted MIPIC relational terms`` for ``SentenceTransformerTrainer``.

    Args:
        model: the ``SentenceTransformer`` (the trainer swaps in its DDP or compiled
            wrapper through this attribute).
        base_loss: any loss built on the same ``model``, e.g.
            ``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims)``. Not a
            gradient-caching (``Cached...``) loss, nor ``AdaptiveLayerLoss`` /
            ``Matryoshka2dLoss``: both run the encoder their own way.
        matryoshka_dims: the Matryoshka widths (any order, as for ``MatryoshkaLoss``).
        columns: ``"all"`` (the relational terms of every input column, averaged) or
            ``"anchor"`` (the first column only).
        pooling: ``"auto"`` (the model's ``Pooling`` module: ``cls``, ``mean`` or
            ``lasttoken``), or ``"cls"``, ``"mean"``, ``"last"``: how PIC pools and
            which token attends in SIA (``last``: the last real token).
        layers, cka_weight, attention_weight, pic_chain, pic_weight, mic_weight,
        mic_layers, k_fractions, k_min, kernel, ranking, attention_temperature,
        temperature, aggregation, detach_teacher, backend, tau_corr, lambda_var,
        uniformity_t: the relational terms, as in
            :class:`mipic.objectives.relational.RelationalLoss` (by default the nested
            top-k CKA at every layer, weight 1).

    ``forward`` returns ``{"base_loss": ..., "sia_cka": ..., ...}``: the base loss (or
    the entries of its own dict) and each weighted term. Learnable parts (attention
    lifts, PIC heads) are averaged over the ranks when training is distributed; like
    the parameters of sentence-transformers' own losses, they are not saved with the
    model.
    """

    def __init__(
        self,
        model: nn.Module,
        base_loss: nn.Module,
        matryoshka_dims: Sequence[int],
        *,
        columns: str = "all",
        pooling: str = "auto",
        layers: Optional[Sequence[int]] = None,
        cka_weight: float = 1.0,
        attention_weight: float = 0.0,
        pic_chain: Optional[Sequence[Sequence[int]]] = None,
        pic_weight: float = 1.0,
        mic_weight: float = 0.0,
        mic_layers: Optional[Sequence[int]] = None,
        k_fractions: Optional[Sequence[float]] = None,
        k_min: int = 8,
        kernel: str = "linear",
        ranking: str = "cls",
        attention_temperature: float = 1.0,
        temperature: float = 0.05,
        aggregation: str = "mean",
        detach_teacher: bool = True,
        backend: str = "auto",
        tau_corr: float = 0.1,
        lambda_var: float = 1.0,
        uniformity_t: float = 2.0,
    ) -> None:
        super().__init__()
        if columns not in COLUMNS:
            raise ValueError(f"columns must be one of {COLUMNS}; got {columns!r}")
        _check_base_loss(base_loss, model)
        self.model = model
        self.base_loss = base_loss
        self.columns = columns
        self.pooling = _model_pooling(model) if pooling == "auto" else pooling
        if self.pooling not in ("cls", "mean", "last"):
            raise ValueError(f"pooling must be 'auto', 'cls', 'mean' or 'last'; got {pooling!r}")
        config = _transformer(model).auto_model.config
        self.relational = RelationalLoss(
            config.hidden_size, config.num_hidden_layers, matryoshka_dims, layers=layers,
            cka_weight=cka_weight, attention_weight=attention_weight, pic_chain=pic_chain, pic_weight=pic_weight,
            mic_weight=mic_weight, mic_layers=mic_layers, k_fractions=k_fractions, k_min=k_min, kernel=kernel,
            ranking=ranking, attention_temperature=attention_temperature, temperature=temperature,
            aggregation=aggregation, detach_teacher=detach_teacher, backend=backend, tau_corr=tau_corr,
            lambda_var=lambda_var, uniformity_t=uniformity_t,
        )
        self._rank_hooks: Optional[list] = None

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: Optional[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        _refuse_outer_modifier(self.model)
        features = list(sentence_features)
        with _all_hidden_states(self.model, enabled=bool(self.relational.terms)):
            outputs = [self.model(f) for f in features]
        with _serving(self.model, features, outputs), _column_merging_disabled():
            base = self.base_loss(features, labels)
        components = dict(base) if isinstance(base, dict) else {"base_loss": base}
        if not self.relational.terms:
            return components
        if is_distributed() and self._rank_hooks is None:
            self._rank_hooks = average_gradients_across_ranks(self.relational)
        chosen = outputs if self.columns == "all" else outputs[:1]
        for output in chosen:
            if "all_layer_embeddings" not in output:
                raise RuntimeError("the model returned no all_layer_embeddings although its transformer was asked "
                                   "for output_hidden_states; MIPICLoss needs every layer's token states")
            batch = EncodedBatch(output["all_layer_embeddings"], output["attention_mask"].bool(), views=1,
                                 pooling=self.pooling)
            for name, value in self.relational(batch).items():
                share = value / len(chosen)
                components[name] = share if name not in components else components[name] + share
        return components

    def get_config_dict(self) -> dict[str, Any]:
        return {"base_loss": type(self.base_loss).__name__, "columns": self.columns, "pooling": self.pooling,
                **self.relational.get_config_dict()}

    @property
    def citation(self) -> str:
        return self.relational.citation + getattr(self.base_loss, "citation", "")


def _unwrap(model: nn.Module) -> nn.Module:
    """The SentenceTransformer inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    from sentence_transformers import SentenceTransformer

    inner = model
    while not isinstance(inner, SentenceTransformer):
        if hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        else:
            raise TypeError(f"MIPICLoss needs a SentenceTransformer (or a DDP / torch.compile wrapper of one); "
                            f"got {type(model).__name__}")
    return inner


def _transformer(model: nn.Module) -> nn.Module:
    first = next(iter(_unwrap(model).children()), None)
    if first is None or not hasattr(first, "auto_model"):
        raise TypeError("MIPICLoss needs a SentenceTransformer whose first module is a transformers model "
                        f"(sentence_transformers Transformer); got {type(first).__name__} first")
    return first


def _model_pooling(model: nn.Module) -> str:
    for module in _unwrap(model).children():
        mode = getattr(module, "pooling_mode", None)
        if mode is None and hasattr(module, "get_pooling_mode_str"):  # sentence-transformers < 6
            mode = module.get_pooling_mode_str()
        if mode is not None:
            if isinstance(mode, str) and mode in _ST_POOLINGS:
                return _ST_POOLINGS[mode]
            raise ValueError(f"the model pools with {mode!r}; pass pooling='cls', 'mean' or 'last' to MIPICLoss "
                             "to say which token attends and how PIC pools")
    raise ValueError("the model has no Pooling module; pass pooling='cls', 'mean' or 'last' to MIPICLoss")


def _check_base_loss(base_loss: nn.Module, model: nn.Module) -> None:
    if not isinstance(base_loss, nn.Module):
        raise TypeError(f"base_loss must be an initialised loss module; got {type(base_loss).__name__}")
    if getattr(base_loss, "model", model) is not model:
        raise ValueError("base_loss must be built on the same model as MIPICLoss: it reuses MIPICLoss's forward pass")
    for module in base_loss.modules():
        name = type(module).__name__
        if isinstance(module, MIPICLoss):
            raise ValueError("MIPICLoss must not be nested in another MIPICLoss")
        if name in ("AdaptiveLayerLoss", "Matryoshka2dLoss"):
            raise ValueError(f"{name} cannot be the base loss of MIPICLoss: it re-runs the encoder layer by layer "
                             "through its own forward hooks")
        # sentence-transformers >= 6 marks them; older versions name them Cached...
        if getattr(module, "uses_gradient_cache", False) or name.startswith("Cached"):
            raise ValueError(f"{name} cannot be the base loss of MIPICLoss: gradient caching avoids holding the "
                             "whole batch's activations, which the relational terms need")


def _refuse_outer_modifier(model: nn.Module) -> None:
    """MatryoshkaLoss (and AdaptiveLayerLoss) patch ``model.forward`` while their inner
    loss runs: finding their decorator there means MIPICLoss is an inner loss."""
    for candidate in (model, _unwrap(model)):
        forward = vars(candidate).get("forward")
        if type(forward).__name__ in ("ForwardDecorator", "TransformerDecorator") and \
                type(forward).__module__.startswith("sentence_transformers"):
            raise ValueError(
                "MIPICLoss must not be the inner loss of MatryoshkaLoss (or another loss that re-runs its inner loss "
                "per width or layer): it computes every width in one call, and would run once per width on "
                "re-sliced outputs. Wrap the other way round: "
                "MIPICLoss(model, MatryoshkaLoss(model, base_loss, dims), dims)")


@contextlib.contextmanager
def _all_hidden_states(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Make the transformer return every layer's hidden states (``all_layer_embeddings``)."""
    if not enabled:
        yield
        return
    config = _transformer(model).auto_model.config
    saved = config.output_hidden_states
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = saved


@contextlib.contextmanager
def _serving(model: nn.Module, features: list, outputs: list) -> Iterator[None]:
    """While the base loss runs, ``model(f)`` for one of ``features`` returns (a shallow
    copy of) its output from MIPICLoss's forward instead of running the encoder again;
    other calls go through. ``model.forward`` is restored even if the base loss fails."""
    patched = "forward" in vars(model)
    saved = vars(model).get("forward")
    original = model.forward

    def forward(f, *args, **kwargs):
        if not args and not kwargs:
            for known, output in zip(features, outputs):
                if f is known:
                    return dict(output)  # the base loss may re-slice entries (MatryoshkaLoss does)
        return original(f, *args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        if patched:
            model.forward = saved
        else:
            del model.forward


def _column_merging_disabled() -> contextlib.AbstractContextManager:
    """sentence-transformers >= 6 may embed several columns in one merged forward pass;
    the base loss must call the model once per column so that it meets the cached outputs."""
    try:
        from sentence_transformers.base.losses.merged_forward import column_merging_disabled
    except ImportError:  # older versions run one forward per column anyway
        return contextlib.nullcontext()
    return column_merging_disabled()
