"""Recognise checkpoints that are not dist-train's, so resume and ``ckpt inspect|verify`` say what they are
(and which conversion to run) instead of "never committed" or a fresh start next to someone's weights.

    describe_foreign("some/dir")        # "some/dir is a stock torch.distributed.checkpoint (DCP) directory…" or None
    describe_foreign_tree("ckpts")      # the same for a directory of step_N checkpoints
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.storage import RAW_FORMAT, CheckpointError, load_dcp_metadata

PathLike = Union[str, os.PathLike]


def _stock_dcp(path: Path) -> bool:
    """The .metadata under ``path`` indexes stock DCP shards (not our raw ones; unreadable: not decided here,
    the damage is reported by verification)."""
    try:
        md = load_dcp_metadata(path / mf.DCP_METADATA)
    except CheckpointError:
        return False
    return not any(RAW_FORMAT in (getattr(i, "transform_descriptors", None) or ())
                   for i in (md.storage_data or {}).values())


def describe_foreign(path: PathLike) -> Optional[str]:
    """One sentence saying what ``path`` is when it is a checkpoint but not a dist-train one (a stock DCP
    directory, a Hugging Face model directory, a torch.save file), with the conversion to run; else None."""
    p = Path(path)
    if p.is_file():
        if p.suffix in (".pt", ".pth", ".bin"):
            return (f"{p} is a torch.save file, not a dist-train checkpoint; save it with dcp.save and convert it "
                    f"with: dist-train ckpt convert DCP_DIR --from dcp OUT")
        if p.suffix == ".safetensors":
            return f"{p} is a safetensors file, not a dist-train checkpoint (a Hugging Face directory converts with --from hf)"
        return None
    if not p.is_dir() or (p / mf.MANIFEST).exists():
        return None
    if (p / mf.DCP_METADATA).is_file():
        if _stock_dcp(p):
            return (f"{p} is a stock torch.distributed.checkpoint (DCP) directory, not a dist-train checkpoint "
                    f"(no {mf.MANIFEST}); convert it with: dist-train ckpt convert {p} --from dcp OUT")
        return None  # our raw shards without a manifest: an uncommitted dist-train save, reported as such
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return (f"{p} is a Hugging Face model directory, not a dist-train checkpoint; convert it with: "
                f"dist-train ckpt convert {p} --from hf OUT")
    saved = sorted(q.name for q in p.iterdir() if q.suffix in (".pt", ".pth") and q.is_file())
    if saved and not mf.list_checkpoints(p):
        return (f"{p} holds torch.save files ({', '.join(saved[:3])}), not dist-train checkpoints; save the state "
                "dict with dcp.save and convert it with: dist-train ckpt convert DCP_DIR --from dcp OUT")
    return None


def describe_foreign_tree(root: PathLike) -> Optional[str]:
    """:func:`describe_foreign` of ``root`` or, when it is a directory of them, its first foreign ``step_N``."""
    found = describe_foreign(root)
    if found:
        return found
    for _, p in mf.list_checkpoints(root):
        found = describe_foreign(p)
        if found:
            return found
    return None
