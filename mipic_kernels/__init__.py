"""Fast, exact Matryoshka relational losses: batched linear and RBF CKA with nested
top-k token selection, an eager reference and fused Triton kernels."""

from .api import cka, nested_cka
from .losses import NestedCKALoss
from .minibatch import MinibatchCKA
from .pairwise import cka_matrix

__all__ = ["cka", "nested_cka", "NestedCKALoss", "cka_matrix", "MinibatchCKA"]
__version__ = "0.1.0"
