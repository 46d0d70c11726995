"""dist-train: distributed long-context training (context, window, tensor, pipeline and ZeRO parallelism)."""
__version__ = "0.1.0"
