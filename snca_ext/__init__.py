"""snca_ext: Scalable Neighborhood Component Analysis with a fused, memory-lean bank op.

The core (this package's top level; needs only torch): the fused ops (``snca_loss``,
``snca_stats``, ``bank_topk``) and their backends, the memory bank and loss modules, weighted kNN
and few-shot metrics on feature matrices, and the sharded bank for torch.distributed
(``snca_ext.distributed``). The applications (training program, data sets, models, checkpoints,
export, neighbour browser; ``snca_ext.apps``) sit on this public API and are not imported here.
"""

from .backends import BACKENDS, available_backends
from .episodes import FewShotResult, few_shot_accuracy, sample_episodes
from .knn import BankKNN, KnnResult, knn_accuracy, knn_counts, knn_predict, knn_scores, knn_votes
from .loss import SNCACriterion, SNCALoss
from .memory import MemoryBank, MomentumSchedule, momentum_update
from .ops import (
    SNCAPartials,
    SNCAStats,
    TopK,
    bank_topk,
    loss_from_lse,
    snca_loss,
    snca_partials,
    snca_stats,
)

__all__ = [
    "BACKENDS",
    "BankKNN",
    "FewShotResult",
    "KnnResult",
    "MemoryBank",
    "MomentumSchedule",
    "SNCACriterion",
    "SNCALoss",
    "SNCAPartials",
    "SNCAStats",
    "TopK",
    "available_backends",
    "bank_topk",
    "few_shot_accuracy",
    "knn_accuracy",
    "knn_counts",
    "knn_predict",
    "knn_scores",
    "knn_votes",
    "loss_from_lse",
    "momentum_update",
    "sample_episodes",
    "snca_loss",
    "snca_partials",
    "snca_stats",
]
__version__ = "0.2.0"
