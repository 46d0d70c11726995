"""A checkpoint tensor of which this rank holds any number of rectangles: ``Rectangles``.

    r = Rectangles(torch.Size([V, d]), [((row0, 0), view0), ((row1, 0), view1)])   # views of this rank's memory
    dcp.save({"model.output.weight": r}, ...)   # writes view0 at [row0:row0+n0, 0:d], view1 at [row1:…], nothing else
    dcp.load({"model.output.weight": r}, ...)   # reads exactly those rectangles of the stored tensor into the views

Why: a ``DTensor`` describes one block per rank by its placements; an FSDP2 shard of a tensor-parallel shard (a
rank's rows of its tp rank's rows of the tp=1 tensor) is one block of the tp=1 tensor only when no vocabulary
padding and no strided (fused q|k|v) split is involved — in general it is up to ``stride`` blocks, clipped where the
tp shard is padding (checkpoint/adapters.py ``fsdp_rectangles``). This class states the blocks directly, through the
three methods DCP asks every tensor it saves or loads (``__create_write_items__``, ``__create_chunk_list__``,
``__get_tensor_shard__`` — the ``_Checkpointable`` protocol ``DTensor`` implements, torch 2.13
``torch/distributed/checkpoint/planner_helpers.py``), so a rank writes and reads only its own bytes: nothing is
gathered, and DCP reshards to and from any other layout as it does for DTensors (its global plan checks that the
ranks' rectangles tile each tensor exactly: no overlap, no hole).

It is a tensor for the code that sorts and describes checkpoint entries (``isinstance(t, torch.Tensor)``, global
``shape``, ``dtype``, ``numel()``) and nothing else: any torch operation on it raises; use ``pieces``.
"""
from __future__ import annotations

from math import prod
from typing import Any, Optional, Sequence

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

Piece = tuple[tuple[int, ...], torch.Tensor]  # (offsets in the global tensor, this rank's tensor of that block)


class Rectangles(torch.Tensor):
    """A tensor of global ``shape`` of which this rank holds ``pieces``: ``(offsets, tensor)`` blocks (none when it
    holds nothing of it), each ``tensor`` [*sizes] the global tensor's ``[offsets[i] : offsets[i] + sizes[i]]``.
    ``source``: what the pieces are views of (the adapter maps a loaded entry back to it)."""

    pieces: list[Piece]
    source: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, shape: torch.Size, pieces: list[Piece], dtype: torch.dtype, device: torch.device,
                source: Optional[torch.Tensor] = None) -> "Rectangles":
        for offsets, t in pieces:
            if (len(offsets) != len(shape) or t.dim() != len(shape) or t.dtype != dtype
                    or any(o < 0 or o + n > s for o, n, s in zip(offsets, t.shape, shape))):
                raise ValueError(f"a {t.dtype} block of shape {list(t.shape)} at {list(offsets)} does not fit a "
                                 f"{dtype} tensor of shape {list(shape)}")
        r = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        r.pieces = [(tuple(int(o) for o in offsets), t) for offsets, t in pieces]
        r.source = source
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{func} on a checkpoint Rectangles tensor: it only describes blocks for DCP; operate on its "
                        ".pieces")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Rectangles(shape={list(self.shape)}, dtype={self.dtype}, pieces={[o for o, _ in self.pieces]})"

    # -- DCP's _Checkpointable protocol ------------------------------------------------------------------------
    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), t.shape),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self.shape))
                for i, (offsets, t) in enumerate(self.pieces)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(offsets), t.shape) for offsets, t in self.pieces]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.pieces) and \
                torch.Size(self.pieces[index.index][0]) == index.offset:
            return self.pieces[index.index][1]
        for offsets, t in self.pieces:
            if torch.Size(offsets) == index.offset:
                return t
        raise ValueError(f"'{index.fqn}': this rank holds no block at {index.offset} "
                         f"(it holds {[list(o) for o, _ in self.pieces]})")


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Elements ``[start, stop)`` of a row-major tensor of ``shape`` as ``(offsets, sizes)`` boxes, in memory order.

    A flat range is a partial row, whole rows, a partial row — recursively for the partial rows of an N-d tensor, so
    at most ``2·N - 1`` boxes. Each box is ``(i0, …, ik, j, 0, …)`` with sizes ``(1, …, 1, m, full, …)``: contiguous in
    memory, so a box of a flat range is a *view* of the flat range reshaped."""
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    rest = tuple(shape[1:])
    inner = prod(rest)
    zeros = (0,) * len(rest)
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    if start % inner:  # the end of a partial first row
        row = start // inner
        end = min(stop, (row + 1) * inner)
        boxes += [((row,) + o, (1,) + s) for o, s in flat_range_boxes(rest, start - row * inner, end - row * inner)]
        start = end
    rows = (stop - start) // inner
    if rows and start < stop:
        boxes.append(((start // inner,) + zeros, (rows,) + rest))
        start += rows * inner
    if start < stop:  # the beginning of a partial last row
        row = start // inner
        boxes += [((row,) + o, (1,) + s) for o, s in flat_range_boxes(rest, 0, stop - start)]
    return boxes


def flat_range_pieces(flat: torch.Tensor, shape: Sequence[int], start: int) -> list[Piece]:
    """``flat`` [n] (1-D, contiguous): elements ``[start, start + n)`` of a row-major tensor of ``shape`` — a ZeRO
    partition's fragment of a parameter — as :class:`Rectangles` pieces of that tensor, each a view of ``flat``
    (:func:`flat_range_boxes`)."""
    pieces: list[Piece] = []
    at = 0
    for offsets, sizes in flat_range_boxes(shape, start, start + flat.numel()):
        n = prod(sizes)
        pieces.append((offsets, flat.narrow(0, at, n).view(sizes)))
        at += n
    return pieces


def local_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensors this rank holds of a checkpoint entry: a plain tensor itself, a DTensor's local shard, a
    :class:`Rectangles` ' pieces."""
    if isinstance(t, Rectangles):
        return [p for _, p in t.pieces]
    if isinstance(t, DTensor):
        return [t.to_local()]
    return [t]
