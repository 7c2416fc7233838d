"""The drop-in losses: MIPICLoss in a real SentenceTransformerTrainer (plain and behind a
real DDP wrapper), and MIPICTrainer on transformers' Trainer, on tiny models built from a
config (no download)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses  # noqa: E402
from sentence_transformers import SentenceTransformerTrainingArguments  # noqa: E402
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from mipic.integrations.hf_trainer import STATE_FILE, MIPICTrainer  # noqa: E402
from mipic.integrations.sentence_transformers import MIPICLoss  # noqa: E402
from mipic.objectives.relational import RelationalLoss  # noqa: E402
from mipic.testing import build_tiny_model  # noqa: E402
from tests import distributed_helpers  # noqa: E402

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:
    from sentence_transformers.models import Pooling, Transformer

ANCHORS = ["a man is playing a guitar", "the dog runs in the park", "two people sitting on a table",
           "a red car on the street", "the old woman is reading a book", "children are eating food",
           "a black cat jumps on the table", "a young man walks with a dog"]
POSITIVES = ["a man plays the guitar", "a dog is running in a park", "people are sitting at a table",
             "a car is red", "a woman reads a book", "the children eat", "a cat on a table",
             "a man and a dog walk"]
DIMS = [32, 16, 8, 4]  # descending, as sentence-transformers users write them


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("bert"), "bert")


def _st_model(folder: str, pooling: str = "cls") -> SentenceTransformer:
    transformer = Transformer(folder, max_seq_length=16)
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling)],
                               device="cpu")


def _features(model, texts):
    tokenize = model.preprocess if hasattr(model, "preprocess") else model.tokenize
    return tokenize(texts)


def _mipic(model, **options):
    base = losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model), DIMS)
    defaults = {"layers": [1, 2, 3], "k_min": 2, "attention_weight": 1.0, "pic_chain": [[8, 1], [16, 2], [32, 3]],
                "mic_weight": 0.1}
    return MIPICLoss(model, base, DIMS, **{**defaults, **options})


def _count_encoder_runs(model) -> list:
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


def _args(tmp_path, cls=SentenceTransformerTrainingArguments, **extra):
    settings = {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                "logging_steps": 1, "learning_rate": 1e-3, "save_strategy": "no", "report_to": [], "use_cpu": True}
    return cls(**{**settings, **extra})


def test_one_trainer_step_logs_every_component_and_runs_the_encoder_once_per_column(tiny_folder, tmp_path):
    model = _st_model(tiny_folder)
    loss = _mipic(model)
    calls = _count_encoder_runs(model)
    lifts_before = [p.detach().clone() for p in loss.relational.parameters()]
    trainer = SentenceTransformerTrainer(model=model, args=_args(tmp_path), loss=loss,
                                         train_dataset=Dataset.from_dict({"anchor": ANCHORS, "positive": POSITIVES}))
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2
    for row in logged:
        assert {"base_loss", "sia_cka", "sia_attention", "pic", "mic_scr", "mic_sir"} <= set(row)
        parts = sum(row[k] for k in ("base_loss", "sia_cka", "sia_attention", "pic", "mic_scr", "mic_sir"))
        assert row["loss"] == pytest.approx(parts, abs=1e-3)  # the logged parts are rounded to 4 decimals
    assert len(calls) == 2 * 2  # two columns, two steps: no second forward for the base loss
    assert "forward" not in vars(model)  # the serving patch is gone
    # The loss's own parameters (lifts, PIC heads) are trained with the model.
    assert any(not torch.equal(a, b) for a, b in zip(lifts_before, loss.relational.parameters()))


def test_base_loss_is_unchanged_when_the_weights_are_zero(tiny_folder):
    model = _st_model(tiny_folder).eval()  # no dropout: both runs see the same encoder outputs
    features = [_features(model, ANCHORS[:4]), _features(model, POSITIVES[:4])]
    base = losses.MatryoshkaLoss(model, losses.MultipleNegativesRankingLoss(model), DIMS)
    expected = base(features, None)
    expected.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    off = MIPICLoss(model, base, DIMS, cka_weight=0.0, attention_weight=0.0)
    out = off(features, None)
    assert set(out) == {"base_loss"} and list(off.relational.parameters()) == []
    assert torch.equal(out["base_loss"], expected)
    out["base_loss"].backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]))
    # With the terms on, the base part is still the base loss: it reads the same outputs.
    model.zero_grad()
    on = _mipic(model)(features, None)
    assert torch.equal(on["base_loss"].detach(), expected.detach()) and len(on) == 6


def test_relational_terms_are_the_mean_over_columns_of_the_relational_loss(tiny_folder):
    model = _st_model(tiny_folder, pooling="mean").eval()
    loss = _mipic(model, mic_weight=0.0)
    assert loss.pooling == "mean"
    features = [_features(model, ANCHORS[:4]), _features(model, POSITIVES[:4])]
    out = loss(features, None)
    from mipic.objectives.terms import EncodedBatch
    per_column = []
    for f in features:
        model[0].auto_model.config.output_hidden_states = True
        output = model(dict(f))
        model[0].auto_model.config.output_hidden_states = False
        per_column.append(loss.relational(EncodedBatch(output["all_layer_embeddings"],
                                                       output["attention_mask"].bool(), pooling="mean")))
    for name in ("sia_cka", "sia_attention", "pic"):
        want = (per_column[0][name] + per_column[1][name]) / 2
        assert float(out[name].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    anchor_only = MIPICLoss(model, loss.base_loss, DIMS, columns="anchor", layers=[1, 2, 3], k_min=2)
    value = anchor_only(features, None)["sia_cka"]
    assert float(value.detach()) == pytest.approx(float(per_column[0]["sia_cka"].detach()), rel=1e-5)


def test_nesting_inside_matryoshka_loss_raises_a_clear_error(tiny_folder):
    model = _st_model(tiny_folder)
    inner = MIPICLoss(model, losses.MultipleNegativesRankingLoss(model), DIMS, k_min=2)
    nested = losses.MatryoshkaLoss(model, inner, DIMS)
    with pytest.raises(ValueError, match="must not be the inner loss of MatryoshkaLoss"):
        nested([_features(model, ANCHORS[:4]), _features(model, POSITIVES[:4])], None)
    assert "forward" not in vars(model) or not type(vars(model)["forward"]).__name__.endswith("Decorator")


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda m, o: MIPICLoss(m, losses.AdaptiveLayerLoss(m, losses.MultipleNegativesRankingLoss(m)), DIMS),
         ValueError, "AdaptiveLayerLoss cannot be the base loss"),
        (lambda m, o: MIPICLoss(m, losses.CachedMultipleNegativesRankingLoss(m), DIMS),
         ValueError, "cannot be the base loss of MIPICLoss: gradient caching"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(o), DIMS),
         ValueError, "base_loss must be built on the same model"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(m), DIMS, columns="first"),
         ValueError, "columns must be one of"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(m), [32, 64]),
         ValueError, "matryoshka_dims must be widths in [1, 32]"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(m), DIMS, layers=[0, 4]),
         ValueError, "layers must be layer numbers in [1, 3]"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(m), DIMS, cka_weight=-1),
         ValueError, "cka_weight must be a finite number >= 0"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(m), DIMS, pic_chain=[[8, 1], [64, 2]]),
         ValueError, "pic_chain widths must be <= the hidden size 32"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(m), DIMS, k_fractions=[0.5]),
         ValueError, "k_fractions must have one entry per width below the hidden size (3"),
        (lambda m, o: MIPICLoss(m, losses.MultipleNegativesRankingLoss(m), DIMS, pooling="max"),
         ValueError, "pooling must be 'auto', 'cls', 'mean' or 'last'"),
        (lambda m, o: MIPICLoss(torch.nn.Linear(2, 2), torch.nn.MSELoss(), DIMS),
         TypeError, "MIPICLoss needs a SentenceTransformer"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny_folder, make, error, message):
    model, other = _st_model(tiny_folder), _st_model(tiny_folder)
    with pytest.raises(error) as info:
        make(model, other)
    assert message in str(info.value)


def test_unsupported_pooling_needs_an_explicit_choice(tiny_folder):
    model = _st_model(tiny_folder, pooling="max")
    with pytest.raises(ValueError, match="the model pools with 'max'; pass pooling="):
        MIPICLoss(model, losses.MultipleNegativesRankingLoss(model), DIMS)
    assert MIPICLoss(model, losses.MultipleNegativesRankingLoss(model), DIMS, pooling="mean").pooling == "mean"


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_trainer_swaps_in_a_ddp_wrapper(tiny_folder, tmp_path, one_process_group):
    data = Dataset.from_dict({"anchor": ANCHORS[:4], "positive": POSITIVES[:4]})
    results = []
    for wrap in (False, True):
        model = _st_model(tiny_folder).eval()  # the same weights both times, no dropout
        torch.manual_seed(0)  # the same lifts and PIC heads both times
        loss = _mipic(model)
        trainer = SentenceTransformerTrainer(model=model, args=_args(tmp_path), loss=loss, train_dataset=data)
        inputs = trainer.data_collator([data[i] for i in range(4)])
        used = model
        if wrap:
            used = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            trainer.model_wrapped = used
        value = trainer.compute_loss(used, dict(inputs))
        value.backward()
        if wrap:
            # The trainer put the wrapper into every loss that holds the model.
            assert loss.model is used and loss.base_loss.model is used and loss.base_loss.loss.model is used
            assert "forward" not in vars(used)
        grads = [p.grad.clone() for p in list(model.parameters()) + list(loss.relational.parameters())
                 if p.grad is not None]
        # In eval mode the trainer files the components under "eval".
        results.append((value.detach(), grads, dict(trainer.accum_loss_components["eval"])))
    (plain, plain_grads, plain_parts), (wrapped, wrapped_grads, wrapped_parts) = results
    assert torch.allclose(plain, wrapped, rtol=1e-6)
    assert len(plain_grads) == len(wrapped_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain_grads, wrapped_grads))
    assert {"sia_cka", "pic", "base_loss"} <= set(wrapped_parts)


def test_loss_parameters_average_their_gradients_over_ranks(tmp_path):
    outputs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    distributed_helpers.spawn(distributed_helpers.average_on_two_ranks,
                              lambda r: (r, str(tmp_path / "store"), outputs[r]), timeout=120)
    got = [torch.load(o) for o in outputs]
    # The mean over ranks of each rank's own accumulated gradient, computed here without hooks.
    local = [distributed_helpers.accumulated_gradients(rank, hooked=False) for rank in range(2)]
    for i in range(2):
        want = (local[0][i] + local[1][i]) / 2
        assert torch.allclose(got[0][i], want) and torch.allclose(got[1][i], want)
        assert not torch.allclose(local[0][i], want)


# ------------------------------------------------------------------ transformers Trainer

def _mlm(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder)
    examples = [tokenizer(t) for t in ANCHORS + POSITIVES]
    return tokenizer, model, examples


def test_hf_trainer_adds_the_terms_to_the_model_loss(tiny_folder, tmp_path):
    tokenizer, model, examples = _mlm(tiny_folder)
    relational = RelationalLoss(32, 3, DIMS, attention_weight=1.0, pic_chain=[[8, 1], [32, 3]], k_min=2)
    before = [p.detach().clone() for p in relational.parameters()]
    trainer = MIPICTrainer(model=model, args=_args(tmp_path, TrainingArguments, save_steps=2, save_strategy="steps"),
                           train_dataset=examples, mipic_loss=relational,
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5))
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2 and all({"base_loss", "sia_cka", "sia_attention", "pic"} <= set(r) for r in logged)
    for row in logged:
        assert row["loss"] == pytest.approx(row["base_loss"] + row["sia_cka"] + row["sia_attention"] + row["pic"],
                                            rel=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, relational.parameters()))
    # Saved beside the checkpoint, and restored from it.
    saved = tmp_path / "out" / "checkpoint-2" / STATE_FILE
    assert saved.is_file()
    trained = {k: v.clone() for k, v in relational.state_dict().items()}
    with torch.no_grad():
        for p in relational.parameters():
            p.zero_()
    trainer._load_from_checkpoint(str(saved.parent))
    assert all(torch.equal(trained[k], v) for k, v in relational.state_dict().items())


def test_hf_trainer_loss_is_base_plus_components_scaled_for_accumulation(tiny_folder, tmp_path):
    tokenizer, model, examples = _mlm(tiny_folder)
    relational = RelationalLoss(32, 3, DIMS, k_min=2)
    trainer = MIPICTrainer(model=model, args=_args(tmp_path, TrainingArguments, gradient_accumulation_steps=4),
                           train_dataset=examples, mipic_loss=relational,
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5))
    model.eval()
    torch.manual_seed(1)
    inputs = trainer.data_collator(examples[:4])
    # Asked for, the hidden states stay in the returned outputs.
    loss, outputs = trainer.compute_loss(model, {**inputs, "output_hidden_states": True}, return_outputs=True)
    from mipic.objectives.terms import EncodedBatch
    cka = relational(EncodedBatch(outputs.hidden_states, inputs["attention_mask"].bool()))["sia_cka"]
    assert float(loss) == pytest.approx(float(outputs.loss + cka), rel=1e-6)
    # When the Trainer will not divide the loss by the accumulation steps, the terms are divided here.
    model.train()
    trainer.loss_is_scaled_for_ga = True
    trainer.current_gradient_accumulation_steps = 4
    with torch.no_grad():
        torch.manual_seed(2)
        scaled, out = trainer.compute_loss(model, dict(inputs), return_outputs=True)
        torch.manual_seed(2)
        trainer.loss_is_scaled_for_ga = False
        plain, out2 = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert torch.equal(out.loss, out2.loss)
    assert float(plain - out.loss) == pytest.approx(4 * float(scaled - out.loss), rel=1e-5)


def test_hf_trainer_rejects_what_it_cannot_use(tiny_folder, tmp_path):
    _, model, examples = _mlm(tiny_folder)
    with pytest.raises(TypeError, match="mipic_loss must be a mipic.objectives.relational.RelationalLoss"):
        MIPICTrainer(model=model, args=_args(tmp_path, TrainingArguments), train_dataset=examples,
                     mipic_loss=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pooling must be one of"):
        MIPICTrainer(model=model, args=_args(tmp_path, TrainingArguments), train_dataset=examples,
                     mipic_loss=RelationalLoss(32, 3, DIMS), pooling="max")


def test_example_script_runs_on_a_tiny_model(tiny_folder, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        import hf_trainer_mipic
    finally:
        sys.path.pop(0)
    history = hf_trainer_mipic.main(["--model", tiny_folder, "--dims", "4,8,16,32", "--max-steps", "2",
                                     "--batch-size", "4", "--output", str(tmp_path / "mlm")])
    assert history and all({"base_loss", "sia_cka", "sia_attention"} <= set(row) for row in history)
    assert all(row["base_loss"] == row["base_loss"] for row in history)  # not NaN: tokens were masked


def test_hf_trainer_evaluates_without_returning_hidden_states(tiny_folder, tmp_path):
    tokenizer, model, examples = _mlm(tiny_folder)
    trainer = MIPICTrainer(model=model, args=_args(tmp_path, TrainingArguments), train_dataset=examples,
                           eval_dataset=examples[:8], mipic_loss=RelationalLoss(32, 3, DIMS, k_min=2),
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5))
    inputs = trainer.data_collator(examples[:4])
    _, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert "hidden_states" not in outputs and outputs.logits is not None
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == metrics["eval_loss"]  # finite, not NaN
