"""Window parallelism: Swin (shifted) window attention on an image tiled over a gh×gw grid of ranks.

    from parallelism.window import shard_image, unshard_image, window_parallel_attention

Modules: ``layout`` (which tile each rank holds, uneven), ``halo`` (distributed roll: strips and
corners only, byte counters), ``windows`` (partition, global-coordinate masks, relative position
bias, local attention), ``attention`` (the distributed autograd function and the public API),
``ulysses`` (heads all-to-all for composing with a cp sub-group).
"""
from .attention import shard_image, unshard_image, window_parallel_attention
from .halo import halo_roll, halo_stats, halo_tokens, reset_halo_stats
from .layout import TileLayout, split_counts

__all__ = ["shard_image", "unshard_image", "window_parallel_attention", "halo_roll", "halo_stats",
           "halo_tokens", "reset_halo_stats", "TileLayout", "split_counts"]
