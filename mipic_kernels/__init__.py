"""Fast, exact Matryoshka relational losses: batched linear and RBF CKA with nested
top-k token selection, an eager reference and fused Triton kernels."""

from .api import cka, nested_cka
from .losses import NestedCKALoss

__all__ = ["cka", "nested_cka", "NestedCKALoss"]
__version__ = "0.1.0"
