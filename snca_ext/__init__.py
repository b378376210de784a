"""snca_ext: Scalable Neighborhood Component Analysis with a fused, memory-lean bank op."""

from .knn import KnnResult, knn_evaluate, knn_predict, knn_scores
from .memory import MemoryBank, MomentumSchedule, SNCACriterion
from .ops import BACKENDS, available_backends, bank_topk, loss_from_lse, snca_loss, snca_stats

__all__ = [
    "BACKENDS",
    "KnnResult",
    "MemoryBank",
    "MomentumSchedule",
    "SNCACriterion",
    "available_backends",
    "bank_topk",
    "knn_evaluate",
    "knn_predict",
    "knn_scores",
    "loss_from_lse",
    "snca_loss",
    "snca_stats",
]
__version__ = "0.1.0"
