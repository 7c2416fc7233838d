"""Drop-in MIPIC losses for other trainers.

* :mod:`mipic.integrations.sentence_transformers`: ``MIPICLoss``, a modifier loss for
  ``SentenceTransformerTrainer`` that adds the relational terms to any base loss;
* :mod:`mipic.integrations.hf_trainer`: ``MIPICTrainer`` / ``MIPICTrainerMixin``, which add
  them to the loss of any transformers model run by ``transformers.Trainer``.

Both compute :class:`mipic.objectives.relational.RelationalLoss` on the model's hidden
states. Each submodule imports its trainer library only when imported itself.
"""
