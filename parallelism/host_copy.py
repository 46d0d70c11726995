"""Host-built tensors (masks, labels, index tables made from layout integers) onto the device without a sync.

    mask = to_device(mask_built_on_the_host, q.device)

A plain ``.to("cuda")`` of pageable host memory is a synchronising copy: torch waits for it, and so for all the
work queued before it (``torch.cuda.set_sync_debug_mode("error")`` refuses it). One per attention block or layer
turns a GPU step into host and device taking turns. A copy from pinned memory is enqueued like a kernel; torch's
caching host allocator keeps the pinned block until the copy has run.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``: a host tensor goes to CUDA through pinned memory, asynchronously; anything else (already
    there, a device tensor, a CPU target) is ``t.to(device)``."""
    device = torch.device(device)
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
