"""The objective terms, one module each, and the trainer's combination of them.

Every term is an ``nn.Module`` with explicit constructor arguments, ``get_config_dict()``
and ``citation``, whose ``forward(batch: EncodedBatch)`` returns a :class:`TermOutput`.
"""

from .ese import ESELoss
from .mic import MICLoss
from .mrl import MRLLoss
from .mta import MTALoss
from .objective import Objective
from .pic import PICLoss
from .sia import SIALoss
from .terms import EncodedBatch, TermOutput, weighted_sum

__all__ = [
    "Objective", "EncodedBatch", "TermOutput", "weighted_sum",
    "MRLLoss", "SIALoss", "PICLoss", "ESELoss", "MICLoss", "MTALoss",
]
