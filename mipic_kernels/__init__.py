"""Fast, exact Matryoshka relational losses: batched linear and RBF CKA with nested
top-k token selection, an eager reference and fused Triton kernels; MIC's soft
collapse and spectral isotropy regularisers at every width in one pass; span relation
distances between two models (MTA's structural alignment), batched."""

from .api import cka, nested_cka
from .losses import NestedCKALoss
from .mic import soft_collapse, spectral_isotropy
from .mic_losses import SoftCollapseLoss, SpectralIsotropyLoss
from .minibatch import MinibatchCKA
from .pairwise import cka_matrix
from .relation import SpanRelationLoss, pool_spans, span_relation_distance

__all__ = [
    "cka", "nested_cka", "NestedCKALoss",
    "soft_collapse", "spectral_isotropy", "SoftCollapseLoss", "SpectralIsotropyLoss",
    "cka_matrix", "MinibatchCKA", "span_relation_distance", "pool_spans", "SpanRelationLoss",
]
__version__ = "0.1.0"
