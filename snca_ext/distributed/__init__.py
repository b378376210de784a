"""SNCA on several processes (``torchrun``): a replicated or a sharded memory bank.

Replicated (data parallel): every rank holds the whole bank, computes the loss of its own queries
against it, and applies the momentum update of the *global* batch (features and indices
all-gathered), so the banks stay bit-identical on every rank.

Sharded (``--bank-sharding``): rank r holds the contiguous block of rows ``shard_range(N, r, W)``.
Every rank streams the global batch (queries all-gathered) over its block with the fused op and
returns per-query partials: the same-class and other-class log-sum-exps and, when the features
require grad, the softmax-weighted mean bank rows (the gradient accumulators; README, "How it
works"). The partials are combined exactly, as FlashAttention's split-KV combine::

    M        = max_r lse_r                           (all_reduce MAX)
    s_r      = exp(lse_r - M)                        (0 for an empty group on rank r)
    lse      = M + log(sum_r s_r)                    (all_reduce SUM of [s_r, s_r * wmean_r])
    wmean    = sum_r s_r wmean_r / sum_r s_r

and each rank keeps only its own queries' rows, so the backward is local: d lse / d f = wmean / T.
The top-k of the kNN search merges every rank's k candidates (value descending, bank row
ascending). Everything goes through ``torch.distributed`` collectives: gloo on CPU, NCCL on GPU.

Every collective is bounded by the process group's timeout; a failed or timed-out collective
raises ``PeerFailure`` (another rank died or hung) instead of waiting forever.

The parts: ``comm`` (the job and its collectives), ``sharded`` (the sharded loss and kNN search),
``banks`` (the replicated and sharded banks); every public name is importable from here.
"""

from __future__ import annotations

from .banks import ReplicatedMemoryBank, ShardedMemoryBank, gather_blocks, memory_bank_class
from .comm import (
    DEFAULT_TIMEOUT_S,
    DistEnv,
    PeerFailure,
    all_gather_cat,
    all_gather_columns,
    all_reduce,
    any_rank,
    backward,
    barrier,
    broadcast_object,
    gather_sizes,
    global_mean,
    guarded,
    init_from_env,
    launched_by_torchrun,
    launched_distributed,
    local_rows,
    own_slice,
    rank,
    rank_world,
    shard_range,
    shutdown,
    world_size,
)
from .sharded import combine_lse_partials, merge_topk, sharded_snca_loss, sharded_snca_stats, sharded_topk

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistEnv",
    "PeerFailure",
    "ReplicatedMemoryBank",
    "ShardedMemoryBank",
    "all_gather_cat",
    "all_gather_columns",
    "all_reduce",
    "any_rank",
    "backward",
    "barrier",
    "broadcast_object",
    "combine_lse_partials",
    "gather_blocks",
    "gather_sizes",
    "global_mean",
    "guarded",
    "init_from_env",
    "launched_by_torchrun",
    "launched_distributed",
    "local_rows",
    "memory_bank_class",
    "merge_topk",
    "own_slice",
    "rank",
    "rank_world",
    "shard_range",
    "sharded_snca_loss",
    "sharded_snca_stats",
    "sharded_topk",
    "shutdown",
    "world_size",
]
