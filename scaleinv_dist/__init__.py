"""scaleinv-dist: distributed long-context pretraining with scale-invariant attention."""
from .attention import scale_invariant_attention

__all__ = ["scale_invariant_attention"]
__version__ = "0.1.0"
