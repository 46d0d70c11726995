"""A ``PipelineStage`` that tells its stage module which pipeline micro-batch it is running.

Why: with packed documents (``data.document_mask`` / ``reset_positions``) every sample has its own
document boundaries and positions, and a stage's input carries only the activations. Every pipeline rank
holds the whole local batch's boundaries and positions (the batcher derives them from the token ids on every
rank), so a stage picks its micro-batch's rows itself; the schedules (1F1B, interleaved 1F1B) run micro-batches
out of order across stages and interleave forwards with backwards, so the index comes from the schedule's own
``forward_one_chunk`` call, not from a counter. Imported by a pipeline rank alone (it imports
``torch.distributed.pipelining``, hence torch._dynamo: see ``PipelineEngine._build_schedule``).
"""
from __future__ import annotations

from typing import Any

from torch.distributed.pipelining import PipelineStage


class MicroBatchIndexedStage(PipelineStage):
    """``PipelineStage`` whose module's ``micro_index`` is set to the micro-batch of each forward."""

    def forward_one_chunk(self, fwd_chunk_id: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                          save_forward_output: bool = True):
        self.submod.micro_index = fwd_chunk_id
        return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
