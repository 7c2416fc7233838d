"""Each loss term against a small hand-checked computation, and where gradients flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import mipic_kernels as mk
from mipic_kernels import nested_cka
from mipic.config import config_from_dict
from mipic.encoder import Encoder, pool, query_positions
from mipic.objectives import EncodedBatch, ESELoss, MICLoss, MRLLoss, Objective, PICLoss, SIALoss, weighted_sum
from mipic.objectives.mrl import info_nce
from mipic.objectives.sia import default_k_fractions
from mipic.testing import build_tiny_model


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("bert"), "bert")


def _loop_info_nce(a, p, tau, n=None):
    """InfoNCE written out one anchor at a time."""
    total = 0.0
    cands = list(p) + ([] if n is None else list(n))
    for i, ai in enumerate(a):
        sims = [float(F.cosine_similarity(ai, c, dim=0)) / tau for c in cands]
        total += -sims[i] + math.log(sum(math.exp(s) for s in sims))
    return total / len(a)


def test_info_nce_by_hand(gen):
    a, p, n = (torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    assert float(info_nce(a, p, 0.1)) == pytest.approx(_loop_info_nce(a, p, 0.1), rel=1e-5)
    assert float(info_nce(a, p, 0.3, n)) == pytest.approx(_loop_info_nce(a, p, 0.3, n), rel=1e-5)
    # A perfect match at a low temperature costs almost nothing.
    eye = torch.eye(4)
    assert float(info_nce(eye, eye, 0.01)) < 1e-10


def test_mrl_truncates_then_normalises(gen):
    a, p = torch.randn(6, 12, generator=gen), torch.randn(6, 12, generator=gen)
    per_width = MRLLoss([3, 5, 12], 0.05).per_width(a, p)
    for value, d in zip(per_width, [3, 5, 12]):
        assert float(value) == pytest.approx(_loop_info_nce(a[:, :d], p[:, :d], 0.05), rel=1e-4)


def _sia_inputs(gen, b=3, t=9, d=16, layers=2):
    hidden = [torch.randn(b, t, d, generator=gen, dtype=torch.float64) for _ in range(layers + 1)]
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 4:] = False
    return hidden, mask


def test_sia_attention_kl_by_hand(gen):
    hidden, mask = _sia_inputs(gen)
    sia = SIALoss(16, [4, 8, 16], [1, 2], attention_temperature=0.7, k_min=2)
    query = torch.tensor([0, 0, 0])
    att = sia.per_term([h.float() for h in hidden], mask, query)["sia_attention"]
    expected = []
    for l in (1, 2):
        for d in (4, 8):
            lift = sia.lifts[f"layer{l}_width{d}"].weight.detach().double()  # (16, d)
            kls = []
            for b in range(3):
                m = int(mask[b].sum())
                h = hidden[l][b, :m]
                q = h[0]
                teacher = torch.softmax((h @ q / 4.0) / 0.7, 0)
                student = torch.softmax(((h[:, :d] @ lift.T) @ q / 4.0) / 0.7, 0)
                kls.append(float((student * (student.log() - teacher.log())).sum()))
            expected.append(sum(kls) / 3)
    assert float(att.detach()) == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    sia_sum = SIALoss(16, [4, 8, 16], [1, 2], attention_temperature=0.7, k_min=2, aggregation="sum")
    sia_sum.load_state_dict(sia.state_dict())
    att_sum = sia_sum.per_term([h.float() for h in hidden], mask, query)["sia_attention"]
    assert float(att_sum.detach()) == pytest.approx(sum(expected), rel=1e-4)


def test_sia_cka_is_one_stacked_call_of_nested_cka(gen):
    hidden, mask = _sia_inputs(gen)
    fractions = [0.5, 1.0]
    sia = SIALoss(16, [4, 8, 16], [1, 2], k_fractions=fractions, k_min=3, backend="torch")
    cka = sia.per_term(hidden, mask, torch.zeros(3, dtype=torch.long))["sia_cka"]
    gaps = []
    for l in (1, 2):
        values = nested_cka(hidden[l], [4, 8], k=fractions, k_min=3, scores="cls", mask=mask)
        gaps.append(1 - values)  # (B, W), all defined here
    assert float(cka) == pytest.approx(float(torch.stack(gaps).mean()), rel=1e-6)
    assert default_k_fractions(6) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert default_k_fractions(10)[-1] == 1.0


@pytest.mark.parametrize("detach", [True, False])
def test_sia_gradients_reach_prefixes_only_when_teacher_detached(gen, detach):
    hidden, mask = _sia_inputs(gen)
    states = [h.float().requires_grad_() for h in hidden]
    sia = SIALoss(16, [4, 8, 16], [1, 2], k_min=2, detach_teacher=detach)
    parts = sia.per_term(states, mask, torch.zeros(3, dtype=torch.long))
    (parts["sia_attention"] + parts["sia_cka"]).backward()
    for l in (1, 2):
        grad = states[l].grad
        assert grad[..., :8][mask].abs().sum() > 0
        beyond_prefixes = grad[..., 8:][mask].abs().sum()
        assert (beyond_prefixes > 0) == (not detach)
        assert grad[~mask].abs().sum() == 0  # padding never receives gradient
    assert states[0].grad is None  # layer 0 is not configured
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sia.lifts.parameters())


def test_pic_by_hand_and_detached_targets(gen):
    pic = PICLoss([[4, 1], [8, 2], [16, 3]], temperature=0.1)
    assert [tuple(h[0].weight.shape) for h in pic.heads] == [(4, 4), (8, 8)]  # hidden max(d_i, d_i+1) // 2
    pooled = {l: torch.randn(5, 16, generator=gen).requires_grad_() for l in (1, 2, 3)}
    links = pic.links(pooled)
    for i, (d_in, l_in, d_out, l_out) in enumerate([(4, 1, 8, 2), (8, 2, 16, 3)]):
        prediction = pic.heads[i](pooled[l_in][:, :d_in])
        hand = _loop_info_nce(prediction.detach().double(), pooled[l_out][:, :d_out].detach().double(), 0.1)
        assert float(links[i].detach()) == pytest.approx(hand, rel=1e-4)
    links.sum().backward()
    assert pooled[3].grad is None  # only ever a target
    assert pooled[1].grad[:, :4].abs().sum() > 0 and pooled[1].grad[:, 4:].abs().sum() == 0
    # Layer 2 is a source of link 2 (its first 8 features) and a detached target of link 1.
    assert pooled[2].grad[:, 8:].abs().sum() == 0


def test_mic_stacks_its_layers_into_the_kernels_regularisers(gen):
    hidden, mask = _sia_inputs(gen, b=4)
    batch = EncodedBatch(hidden, mask, views=1, pooling="cls")
    out = MICLoss(16, [4, 8, 16], [1, 2], tau_corr=0.05, lambda_var=0.5, uniformity_t=1.5)(batch)
    states = torch.stack([hidden[1], hidden[2]])
    layer_mask = mask.expand(2, *mask.shape)
    scr = mk.soft_collapse(states, [4, 8], mask=layer_mask, tau_corr=0.05, lambda_var=0.5).mean()
    sir = mk.spectral_isotropy(pool(states, mask, "mean"), [4, 8], t=1.5).mean()  # MIC always mean-pools
    assert float(out.parts["mic_scr"]) == pytest.approx(float(scr), rel=1e-12)
    assert float(out.parts["mic_sir"]) == pytest.approx(float(sir), rel=1e-12)
    assert float(out.loss) == pytest.approx(float(scr + sir), rel=1e-12)


def test_weighted_sum_evaluates_nested_formulas_as_written():
    parts = {name: torch.tensor(value, dtype=torch.float64) for name, value in
             {"a": 1.5, "b": -2.0, "c": 0.25, "d": 3.0}.items()}
    formula = [(0.4, "a"), (0.6, [(0.5, "b"), (2.0, "c")]), (1.0, "d")]
    assert float(weighted_sum(formula, parts)) == 0.4 * 1.5 + 0.6 * (0.5 * -2.0 + 2.0 * 0.25) + 3.0
    with pytest.raises(ValueError, match="at least one term"):
        weighted_sum([], parts)


def test_every_term_runs_alone_on_an_encoded_batch(gen):
    hidden, mask = _sia_inputs(gen, b=4)
    states = [torch.cat([h, h + 0.1 * torch.randn(h.shape, generator=gen, dtype=h.dtype)]).requires_grad_()
              for h in hidden]
    pairs = EncodedBatch(states, torch.cat([mask, mask]), views=2, pooling="mean")
    terms = [
        MRLLoss([4, 8, 16], 0.1, weights=[1.0, 0.5, 2.0]),
        SIALoss(16, [4, 8, 16], [1, 2], k_min=2),
        PICLoss([[4, 1], [16, 2]], 0.1),
        ESELoss([4, 8, 16], [1, 2], 0.1),
        MICLoss(16, [4, 8, 16], [2]),
    ]
    for term in terms:
        out = term(pairs)
        assert out.parts and all(v.requires_grad for v in out.parts.values())
        assert float(out.loss.detach()) == pytest.approx(float(sum(out.parts.values()).detach()), rel=1e-12)
        config = term.get_config_dict()
        assert config and all(isinstance(k, str) for k in config)
        assert "@" in term.citation and "title" in term.citation
    mrl = terms[0](pairs)
    per_width = [mrl.details[f"mrl@{d}"] for d in (4, 8, 16)]
    expected = per_width[0] + 0.5 * per_width[1] + 2.0 * per_width[2]
    assert float(mrl.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # The attention half alone builds lifts; the CKA half alone builds none.
    cka_only = SIALoss(16, [4, 8, 16], [1, 2], attention=False, k_min=2)
    assert cka_only.lifts is None and list(cka_only.parameters()) == []
    assert set(cka_only(pairs).parts) == {"sia_cka"}
    assert set(SIALoss(16, [4, 16], [1], cka=False)(pairs).parts) == {"sia_attention"}


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda h, m: MRLLoss([4, 8])(EncodedBatch(h, m, views=1)), "MRLLoss needs 2 or 3 views"),
        (lambda h, m: ESELoss([4, 8], [1])(EncodedBatch(h, m, views=1)), "ESELoss needs 2 or 3 views"),
        (lambda h, m: EncodedBatch(h, m, pooling="max"), "pooling must be one of"),
        (lambda h, m: EncodedBatch(h, m.long()), "mask must be a (views * B, T) bool tensor"),
        (lambda h, m: EncodedBatch(h, m, views=2), "views must be 1, 2 or 3 and divide the 3 rows"),
        (lambda h, m: EncodedBatch([x[:, :5] for x in h], m), "hidden[0] must have shape (3, 9) + (D,)"),
        (lambda h, m: MRLLoss([8, 4]), "dims must be strictly increasing"),
        (lambda h, m: MRLLoss([4, 8], weights=[1.0]), "weights must be 2 non-negative numbers"),
        (lambda h, m: PICLoss([[8, 1], [4, 2]]), "chain must be at least 2 [width, layer] links"),
        (lambda h, m: PICLoss([[4, 2], [8, 1]]), "layers not going back"),
        (lambda h, m: SIALoss(16, [4, 16], [1], attention=False, cka=False), "switch on attention, cka or both"),
        (lambda h, m: SIALoss(16, [4, 16], [1], ranking="random"), "ranking must be one of"),
        (lambda h, m: MICLoss(16, [16], [1]), "dims must hold a width below the hidden size 16"),
        (lambda h, m: ESELoss([4, 8], []), "layers must list at least one layer"),
    ],
)
def test_terms_reject_bad_arguments(gen, build, message):
    hidden, mask = _sia_inputs(gen)
    with pytest.raises(ValueError) as info:
        build(hidden, mask)
    assert message in str(info.value)


def test_query_positions_and_last_token_pooling():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)  # right and left padding
    assert query_positions(mask, "last").tolist() == [2, 3, 0]
    assert query_positions(mask, "cls").tolist() == [0, 0, 0]
    h = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    assert torch.equal(pool(h, mask, "last"), torch.stack([h[0, 2], h[1, 3], h[2, 0]]))
    assert torch.allclose(pool(h, mask, "mean")[1], h[1, 1:].mean(0))


def _objective(tiny_bert, **objective):
    cfg = config_from_dict({"model": {"name": tiny_bert, "dims": [4, 8, 16, 32]}, "data": {"path": "x"},
                            "objective": objective})
    encoder = Encoder.from_pretrained(tiny_bert, max_length=16)
    return encoder, Objective(cfg.objective, cfg.model.dims, encoder.hidden_size, encoder.num_layers)


BATCH = [("a man is playing a guitar",), ("the dog runs in the park",), ("two people sitting on a table",),
         ("a red car on the street",)]


def test_objective_combines_terms_as_configured(tiny_bert):
    encoder, objective = _objective(
        tiny_bert, method="mipic", alpha=0.3, sia={"layers": [1, 3], "k_min": 2, "attention_weight": 0.5,
                                                   "cka_weight": 2.0},
        pic={"weight": 0.25, "chain": [[8, 1], [16, 2], [32, 3]]}, mic={"enabled": True, "gamma": 0.2})
    encoder.eval()  # no dropout: the views coincide and the parts are reproducible
    loss, parts = objective(encoder, BATCH)
    aux = 0.5 * parts["sia_attention"] + 2.0 * parts["sia_cka"] + 0.25 * parts["pic"]
    expected = 0.3 * parts["mrl"] + 0.7 * aux + 0.2 * (parts["mic_scr"] + parts["mic_sir"])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(parts["mrl"]) == pytest.approx(sum(float(parts[f"mrl@{d}"]) for d in (4, 8, 16, 32)), rel=1e-5)
    assert all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    assert all(p.grad is not None for p in objective.parameters())


def test_objective_baselines(tiny_bert):
    encoder, mrl = _objective(tiny_bert, method="mrl")  # the default SIA layers 1..6 are ignored
    encoder.eval()
    loss, parts = mrl(encoder, BATCH)
    assert set(parts) == {"mrl", "loss", "mrl@4", "mrl@8", "mrl@16", "mrl@32"}
    assert list(mrl.parameters()) == []
    _, ese = _objective(tiny_bert, method="ese", ese={"layers": [1, 2], "weight": 0.5})
    loss, parts = ese(encoder, BATCH)
    assert float(loss.detach()) == pytest.approx(float(parts["mrl"] + 0.5 * parts["ese"]), rel=1e-6)
    triplets = [(a[0], b[0], c[0]) for a, b, c in zip(BATCH, BATCH[1:] + BATCH[:1], BATCH[2:] + BATCH[:2])]
    loss, _ = mrl(encoder, triplets)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "objective, message",
    [
        ({"sia": {"layers": [1, 4]}}, "objective.sia.layers must be layer numbers in [1, 3]"),
        ({"sia": {"layers": [1]}, "pic": {"chain": [[8, 1], [64, 2]]}}, "chain widths must be <= the hidden size 32"),
        ({"sia": {"layers": [1]}, "pic": {"chain": [[8, 1], [16, 4]]}}, "objective.pic.chain layers must be"),
        ({"method": "ese"}, "objective.ese.layers must list at least one layer"),
        ({"method": "mrl", "mic": {"enabled": True, "layers": [5]}}, "objective.mic.layers must be layer numbers"),
    ],
)
def test_objective_rejects_what_the_model_cannot_do(tiny_bert, objective, message):
    with pytest.raises(ValueError) as info:
        _objective(tiny_bert, **objective)
    assert message in str(info.value)


def test_dims_must_end_at_hidden_size(tiny_bert):
    cfg = config_from_dict({"model": {"dims": [4, 8]}, "data": {"path": "x"}})
    with pytest.raises(ValueError, match="model.dims must end at the hidden size 32"):
        Objective(cfg.objective, cfg.model.dims, 32, 3)


def test_decoder_pools_and_attends_from_the_last_real_token(tmp_path):
    folder = build_tiny_model(tmp_path / "qwen", "qwen")
    encoder = Encoder.from_pretrained(folder, max_length=16)
    assert encoder.pooling == "last"
    cfg = config_from_dict({"model": {"name": folder, "dims": [8, 16, 32]}, "data": {"path": "x"},
                            "objective": {"sia": {"layers": [1, 2], "k_min": 2},
                                          "pic": {"chain": [[8, 1], [32, 2]]}}})
    objective = Objective(cfg.objective, cfg.model.dims, encoder.hidden_size, encoder.num_layers)
    loss, parts = objective(encoder, BATCH)
    assert torch.isfinite(loss) and {"sia_attention", "sia_cka", "pic"} <= set(parts)
    enc = encoder(["a man", "a man is playing a guitar"])
    pooled = encoder.pool(enc.hidden[-1], enc.mask)
    last = enc.mask.sum(-1) - 1  # right padding here
    assert torch.equal(pooled[0], enc.hidden[-1][0, last[0]])


def test_tiny_model_tokenizer_knows_its_words(tiny_bert):
    encoder = Encoder.from_pretrained(tiny_bert, max_length=16)
    ids = encoder.tokenize(["a man is playing a guitar"])["input_ids"][0].tolist()
    assert encoder.tokenizer.unk_token_id not in ids and len(ids) == 8  # [CLS] 6 words [SEP]


def test_terms_trace_without_graph_breaks(gen):
    # Every term, SIA's nested CKA included: the reference backend reads no sizes on the host.
    hidden = [torch.randn(8, 9, 16, generator=gen).requires_grad_() for _ in range(3)]
    mask = torch.ones(8, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[5, 4:] = False
    terms = [MRLLoss([4, 8, 16], 0.1), SIALoss(16, [4, 8, 16], [1, 2], k_min=2), PICLoss([[4, 1], [16, 2]]),
             ESELoss([4, 16], [1, 2]), MICLoss(16, [4, 8, 16], [2])]

    def total(hidden, mask):
        batch = EncodedBatch(hidden, mask, views=2, pooling="mean")
        return torch.stack([term(batch).loss for term in terms]).sum()

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")(hidden, mask)
    compiled.backward()
    assert float(compiled.detach()) == pytest.approx(float(total(hidden, mask).detach()), rel=1e-6)
    assert all(h.grad is not None for h in hidden[1:])


def test_compiled_training_step_of_an_encoder_with_the_mipic_terms_matches_eager(tiny_bert):
    # The whole step, encoder included, in one graph: tokenising stays outside (strings).
    encoder = Encoder.from_pretrained(tiny_bert, max_length=16).eval()  # no dropout: eager == compiled
    texts = [t for pair in BATCH for t in pair] * 2  # two views of each sentence
    tokens = encoder.tokenize(texts)
    terms = [MRLLoss([8, 16, 32], 0.05), SIALoss(32, [8, 16, 32], [1, 2], k_min=2, kernel="rbf"),
             PICLoss([[8, 1], [32, 2]])]
    modules = torch.nn.ModuleList([encoder.model, *terms])

    def step(input_ids, attention_mask):
        out = encoder.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        batch = EncodedBatch(out.hidden_states, attention_mask.bool(), views=2, pooling="cls")
        return torch.stack([term(batch).loss for term in terms]).sum()

    def loss_and_grads(fn):
        modules.zero_grad(set_to_none=True)
        loss = fn(tokens["input_ids"], tokens["attention_mask"])
        loss.backward()
        return loss.detach(), [p.grad for p in modules.parameters() if p.grad is not None]

    eager = loss_and_grads(step)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    assert torch.isfinite(eager[0]) and all(p.grad is not None for term in terms for p in term.parameters())
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
