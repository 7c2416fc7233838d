"""Masked-language-model training with MIPIC's relational terms, on transformers' Trainer.

The model's own MLM loss is the base; MIPIC adds the nested top-k CKA between every
Matryoshka prefix of the hidden states and the full width at every layer, and the
self-distilled attention term, so that the truncated hidden states keep the token
geometry of the full ones. The loss parts are logged beside the loss.

    pip install "mipic-kernels[hf]"
    python examples/hf_trainer_mipic.py                        # a few built-in sentences
    python examples/hf_trainer_mipic.py --data sentences.txt --max-steps 500 --output runs/mlm
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SENTENCES = [
    "A man is playing a guitar on the street.", "The dog runs across the park after a ball.",
    "Two children are eating ice cream at the beach.", "A woman is reading a book on the train.",
    "The old car would not start in the cold.", "A group of people are sitting at a long table.",
    "The cat jumps onto the kitchen counter.", "A young man rides a bicycle down the hill.",
    "Heavy rain flooded the small village overnight.", "She plays the piano every evening after work.",
    "The chef is slicing onions for the soup.", "A boy throws a stone into the lake.",
    "The museum opens its new exhibition on Monday.", "Two dogs are playing with a rope in the snow.",
    "The team celebrated their victory in the final.", "A girl is painting a picture of the sea.",
]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google-bert/bert-base-uncased", help="hub name or local folder")
    parser.add_argument("--data", help="text file, one sentence per line (default: a few built-in sentences)")
    parser.add_argument("--dims", help="comma-separated Matryoshka widths (default: 16, 32, ... and the hidden size)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)

    from transformers import (AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling,
                              TrainingArguments)

    from mipic.integrations.hf_trainer import MIPICTrainer
    from mipic.objectives.relational import RelationalLoss

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForMaskedLM.from_pretrained(args.model)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    dims = ([int(d) for d in args.dims.split(",")] if args.dims
            else [d for d in (16, 32, 64, 128, 256, 512) if d < hidden] + [hidden])
    texts = Path(args.data).read_text(encoding="utf-8").splitlines() if args.data else SENTENCES
    examples = [tokenizer(t, truncation=True, max_length=64) for t in texts if t.strip()]

    mipic = RelationalLoss(hidden, layers, dims, cka_weight=1.0, attention_weight=1.0, k_min=4)
    output = args.output or tempfile.mkdtemp(prefix="mipic-mlm-")
    trainer = MIPICTrainer(
        model=model,
        args=TrainingArguments(output_dir=output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                               learning_rate=5e-5, logging_steps=max(1, args.max_steps // 10), save_strategy="no",
                               report_to=[], use_cpu=not __import__("torch").cuda.is_available()),
        train_dataset=examples,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        mipic_loss=mipic,
        pooling="cls",
    )
    trainer.train()
    history = [row for row in trainer.state.log_history if "loss" in row]
    for row in history:
        print({k: v for k, v in row.items() if k in ("step", "loss", "base_loss", "sia_cka", "sia_attention")})
    return history


if __name__ == "__main__":
    main()
