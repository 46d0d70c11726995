"""Training engines: how gradients are reduced and the optimizer steps (DDP baseline; DeepSpeed ZeRO)."""
