"""More than one process: ``torch.distributed`` helpers for ``torchrun``-launched evaluation and
sharded gallery scoring (gloo on the CPU, nccl on CUDA)."""
from .collectives import RankFailure, all_gather_objects, all_gather_rows, collective, gather_rows
from .consistency import check_same_options, option_mismatches
from .env import (DEFAULT_TIMEOUT_S, DistEnv, barrier, init_from_env, is_main, launched, rank, shutdown,
                  world_size)
from .launch import join_if_launched, main_rank_output
from .evaluation import sharded_evaluate_baseline, sharded_evaluate_qaconv, sharded_evaluate_trained
from .scoring import (self_score_shares, sharded_extract_features, sharded_score_blocks, sharded_self_score_blocks,
                      sharded_topk, topk_rows)
from .sharding import shard_range, shard_sizes
from .training import (CrossRankBatchNorm, DistributedTraining, ShardedBatchSampler, convert_sync_batchnorm,
                       gather_batch)

__all__ = [
    "CrossRankBatchNorm", "DistributedTraining", "ShardedBatchSampler", "convert_sync_batchnorm", "gather_batch",
    "DEFAULT_TIMEOUT_S", "DistEnv", "RankFailure", "collective", "all_gather_objects", "all_gather_rows", "barrier", "check_same_options",
    "gather_rows", "init_from_env", "is_main", "join_if_launched", "launched", "main_rank_output", "option_mismatches", "rank", "shard_range",
    "shard_sizes", "sharded_evaluate_baseline", "sharded_evaluate_qaconv", "sharded_evaluate_trained", "sharded_extract_features",
    "self_score_shares", "sharded_score_blocks", "sharded_self_score_blocks", "sharded_topk", "topk_rows", "shutdown", "world_size",
]
