"""What a configuration costs: FLOPs, memory, step time and the per-rank layout, in one place.

Depends only on the typed config (``dist_train.config``) and the device profiles
(``dist_train.plan.profiles``); no torch, no process group, so the planner, the dry run, the trainer,
the models and the benchmarks all import it at module top and agree by construction.

    shape.py      the model's shape (one sample) and one rank's share: shape_of, rank_inputs, token_grid
    layout.py     pipeline stages and per-rank loads: pipeline_stages, stages_of_rank, rank_loads
    flops.py      the FLOP convention and MFU accounting: FLOP_CONVENTION, flops_per_token,
                  train_flops_per_token, model_params, Throughput, document_keys (packed S_eff)
    memory.py     the one memory model: memory_model, estimate_memory, evaluation_state_bytes
    step_time.py  the step-time model: time_model
    predict.py    the planner's prediction of a layout: predict, Prediction
"""
from __future__ import annotations

from .flops import (FLOP_CONVENTION, Throughput, attention_flops_per_key, document_keys, flops_per_token,
                    matmul_params, model_params, train_flops_per_token)
from .layout import RankLoad, Stage, pipeline_stages, rank_loads, stages_of_rank
from .memory import MemoryEstimate, estimate_memory, evaluation_state_bytes, memory_model
from .predict import Prediction, predict
from .shape import RankShape, Shape, rank_inputs, shape_of, token_grid

__all__ = ["FLOP_CONVENTION", "MemoryEstimate", "Prediction", "RankLoad", "RankShape", "Shape", "Stage",
           "Throughput", "attention_flops_per_key", "document_keys", "estimate_memory", "evaluation_state_bytes",
           "flops_per_token", "matmul_params", "memory_model", "model_params", "pipeline_stages", "predict",
           "rank_inputs", "rank_loads", "shape_of", "stages_of_rank", "token_grid", "train_flops_per_token"]
