"""NestedCKALoss: the reduction it documents, undefined entries, finiteness."""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch

import mipic_kernels as mk
from tests.seeding import generator


def _x(*shape, seed):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_the_weighted_reduction_of_one_minus_cka(reduction):
    x, scores = _x(3, 4, 20, 12, seed=1), _x(3, 4, 20, seed=2)
    mask = torch.rand(3, 4, 20, generator=generator(3)) < 0.7
    mask[0, 0, 1:] = False  # an undefined entry: one real token
    opts = dict(k=[0.3, 0.6, 0.9], k_min=4, kernel="rbf", unbiased=True)
    loss = mk.NestedCKALoss([3, 6, 9], weights=[0.5, 1.0, 2.0], reduction=reduction, **opts)
    values = mk.nested_cka(x, [3, 6, 9], scores=scores, mask=mask, **opts)
    defined = ~values.isnan()
    assert not defined.all()
    gaps = (1 - values).nan_to_num().reshape(-1, 3).sum(0)
    if reduction == "mean":
        gaps = gaps / defined.reshape(-1, 3).sum(0)
    want = (gaps * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)).sum()
    torch.testing.assert_close(loss(x, scores=scores, mask=mask), want)



@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_gradient_is_autograd_through_the_masked_reduction(reduction):
    # The loss's own backward skips the mask; autograd through the documented formula keeps it.
    x = _x(3, 5, 17, 12, seed=8).requires_grad_()
    mask = torch.rand(3, 5, 17, generator=generator(9)) < 0.6
    mask[0, 0, 1:] = False
    opts = dict(k=[0.3, 0.6, 0.9], k_min=3, kernel="rbf", unbiased=True, detach_full=False)
    loss = mk.NestedCKALoss([3, 6, 9], weights=[0.3, 1.1, 2.7], reduction=reduction, **opts)
    got, = torch.autograd.grad(loss(x, mask=mask), x)
    values = mk.nested_cka(x, [3, 6, 9], mask=mask, **opts).reshape(-1, 3)
    defined = ~values.isnan()
    assert not defined.all()
    gaps = torch.where(defined, 1 - values, 0.0).sum(0)
    if reduction == "mean":
        gaps = gaps / defined.sum(0).clamp(min=1)
    want, = torch.autograd.grad((gaps * torch.tensor([0.3, 1.1, 2.7], dtype=torch.float64)).sum(), x)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want)

def test_loss_is_finite_when_every_entry_is_undefined():
    x = _x(2, 6, 5, seed=4).requires_grad_()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 0] = True
    loss = mk.NestedCKALoss([2, 4], detach_full=False, unbiased=True)(x, mask=mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_loss_gradient_is_finite_with_constant_tokens():
    x = _x(3, 8, 6, seed=5)
    x[1] = 2.0
    x.requires_grad_()
    loss = mk.NestedCKALoss([2, 4], kernel="rbf")(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert (x.grad[1] == 0).all() and x.grad[0].abs().max() > 0


def test_loss_decreases_under_gradient_descent():
    x = _x(4, 16, 10, seed=6).requires_grad_()
    loss_fn = mk.NestedCKALoss([2, 5], k=[0.5, 0.8], k_min=4)
    opt = torch.optim.Adam([x], lr=0.05)
    first = loss_fn(x).item()
    for _ in range(60):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
    assert loss_fn(x).item() < 0.5 * first


def test_per_width_and_float32():
    x = _x(2, 12, 8, seed=7).float()
    loss = mk.NestedCKALoss([2, 8])
    per_width = loss.per_width(x)
    assert per_width.shape == (2,) and per_width.dtype == torch.float32
    assert per_width[1].abs() < 1e-5  # the full width against itself
    assert "dims=[2, 8]" in repr(loss)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dims=[4, 2]), ValueError, "strictly increasing"),
        (dict(dims=[2, 4], weights=[1.0]), ValueError, "weights must be 2"),
        (dict(dims=[2, 4], weights=[1.0, -1.0]), ValueError, "non-negative"),
        (dict(dims=[2, 4], weights=[1.0, float("nan")]), ValueError, "non-negative"),
        (dict(dims=[2, 4], weights=[1.0, "2"]), ValueError, "non-negative floats"),
        (dict(dims=[2, 4], weights=[1.0, True]), ValueError, "non-negative floats"),
        (dict(dims=[2, 4], reduction="max"), ValueError, "reduction must be one of"),
        (dict(dims=[2, 4], k=[0.5]), ValueError, r"k must have one entry per width \(2\)"),
        (dict(dims=[2, 4], k=[0.5, 1.5]), ValueError, r"k entries must be ints >= 1 or floats in \(0, 1\]"),
        (dict(dims=[2, 4], k=0), ValueError, "k must be an int >= 1"),
        (dict(dims=[2, 4], k_min=0), ValueError, "k_min must be an int >= 1"),
        (dict(dims=[2, 4], kernel="cosine"), ValueError, "kernel must be one of"),
        (dict(dims=[2, 4], kernel="rbf", sigma=-1.0), ValueError, "sigma must be a positive finite float"),
        (dict(dims=[2, 4], kernel="rbf", sigma="1"), TypeError, "sigma must be a positive finite float"),
        (dict(dims=[2, 4], rbf_threshold=math.inf), ValueError, "rbf_threshold must be a positive finite"),
        (dict(dims=[2, 4], backend="cuda"), ValueError, "backend must be one of"),
        (dict(dims=[2, 4], precision="tf32"), ValueError, "precision must be one of"),
        (dict(dims=[2, 4], mask=None), TypeError, "unexpected keyword argument 'mask'"),
        (dict(dims=[2, 4], scores="cls"), TypeError, "unexpected keyword argument 'scores'"),
    ],
)
def test_loss_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        mk.NestedCKALoss(**kwargs)


@pytest.mark.parametrize(
    "options",
    [dict(k=[4, 2], kernel="cosine"), dict(dims=[2, 2]), dict(k_min=1.5), dict(sigma=0.0, kernel="rbf")],
    ids=str,
)
def test_loss_constructor_errors_match_the_functional_api(options):
    # The same check raises the same exception, message included.
    options = {"dims": [2, 4], **options}
    with pytest.raises((ValueError, TypeError)) as from_function:
        mk.nested_cka(_x(1, 5, 4, seed=8), **options)
    with pytest.raises(from_function.type, match=re.escape(str(from_function.value))):
        mk.NestedCKALoss(**options)


def test_loss_checks_widths_against_the_input_at_call_time():
    with pytest.raises(ValueError, match=r"dims must hold ints in \[1, D=3\]"):
        mk.NestedCKALoss([2, 4])(_x(1, 5, 3, seed=8))


def test_loss_config_rebuilds_the_loss():
    loss = mk.NestedCKALoss(
        (3, 6), weights=(0.5, 2), reduction="sum", k=[0.5, 4], k_min=2, kernel="rbf",
        unbiased=True, sigma=2, rbf_threshold=0.5, detach_full=False, backend="torch", precision="ieee",
    )
    config = loss.get_config_dict()
    assert config == dict(
        dims=[3, 6], weights=[0.5, 2.0], reduction="sum", k=[0.5, 4], k_min=2, kernel="rbf",
        unbiased=True, sigma=2.0, rbf_threshold=0.5, detach_full=False, backend="torch", precision="ieee",
    )
    assert json.loads(json.dumps(config)) == config
    config["k"].append(1)  # a copy
    rebuilt = mk.NestedCKALoss(**mk.NestedCKALoss(**loss.get_config_dict()).get_config_dict())
    assert rebuilt.get_config_dict() == loss.get_config_dict()
    x = _x(2, 8, 6, seed=9)
    torch.testing.assert_close(rebuilt(x), loss(x))
    assert repr(loss) == (
        "NestedCKALoss(dims=[3, 6], weights=[0.5, 2.0], reduction='sum', k=[0.5, 4], k_min=2, "
        "kernel='rbf', unbiased=True, sigma=2.0, rbf_threshold=0.5, detach_full=False, backend='torch', "
        "precision='ieee')"
    )


def test_loss_defaults_are_the_functional_defaults():
    defaults = {
        name: p.default for name, p in inspect.signature(mk.nested_cka).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("scores", "mask")
    }
    config = mk.NestedCKALoss([2]).get_config_dict()
    assert {name: config[name] for name in defaults} == defaults


def test_compiled_training_step_of_an_encoder_matches_eager(tmp_path):
    # torch.compile(fullgraph=True) must trace an encoder and the loss (reference
    # backend) without a graph break: the loss's host-side input checks are skipped
    # while compiling, and the Gram edge comes from the k spec, not from the data.
    transformers = pytest.importorskip("transformers")
    from mipic.testing import build_tiny_model

    model = transformers.AutoModel.from_pretrained(build_tiny_model(tmp_path)).eval()
    ids = torch.randint(5, 60, (3, 13), generator=generator(9))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    loss_fn = mk.NestedCKALoss([8, 16, 32], k=[0.5, 0.7, 1.0], k_min=4, kernel="rbf", backend="torch")

    def step(ids, mask):
        hidden = torch.stack(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:])
        real = mask.bool().expand(hidden.shape[0], -1, -1)
        return loss_fn(hidden, scores="cls", mask=real)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, mask)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    eager = loss_and_grads(step)  # also installs the model's lazy hooks outside the trace
    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    assert eager[0] > 0 and len(eager[1]) > 0
    torch.testing.assert_close(compiled, eager)
