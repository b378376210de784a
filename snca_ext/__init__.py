"""snca_ext: Scalable Neighborhood Component Analysis with a fused, memory-lean bank op."""

from .ops import BACKENDS, available_backends, bank_topk, loss_from_lse, snca_loss, snca_stats

__all__ = [
    "BACKENDS",
    "available_backends",
    "bank_topk",
    "loss_from_lse",
    "snca_loss",
    "snca_stats",
]
__version__ = "0.1.0"
