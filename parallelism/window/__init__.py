"""Window parallelism: Swin (shifted) window attention on an image tiled over a gh×gw grid of ranks.

    from parallelism.window import shard_image, unshard_image, window_parallel_attention

Modules: ``layout`` (which tile each rank holds, uneven), ``halo`` (distributed roll: strips and
corners only, byte counters), ``windows`` (partition, global-coordinate masks, relative position
bias, local attention), ``attention`` (the distributed autograd function and the public API),
``ulysses`` (the cp ranks of a tile split its token rows; an uneven all-to-all trades a share for the
whole tile on heads/cp heads, so window attention composes with a cp sub-group).
"""
from .attention import shard_image, unshard_image, window_parallel_attention
from .halo import halo_roll, halo_stats, halo_tokens, reset_halo_stats
from .layout import TileLayout, split_counts
from .ulysses import heads_to_shares, reset_ulysses_stats, share_rows, shares_to_heads, ulysses_stats

__all__ = ["shard_image", "unshard_image", "window_parallel_attention", "halo_roll", "halo_stats",
           "halo_tokens", "reset_halo_stats", "TileLayout", "split_counts", "share_rows", "shares_to_heads",
           "heads_to_shares", "ulysses_stats", "reset_ulysses_stats"]
