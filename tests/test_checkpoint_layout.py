"""The parallel layout a checkpoint records (``trainer.layout_dict``) names the cp that runs, and a checkpoint an older
version recorded for the same execution still resumes its RNG states (``CheckpointManager`` restores them only into
the same layout).

A swin with cp > 1 always runs Ulysses inside windows (``cost.shape.cp_execution``), whatever ``parallel.cp_method``
says; before, its checkpoints recorded the configured method (``ring`` by default). A GPT's layout is unchanged.
"""
from __future__ import annotations

import pytest
import torch

from dist_train.checkpoint import CheckpointManager
from dist_train.checkpoint.manager import layout_changes
from dist_train.trainer import layout_dict, recorded_layouts
from tests.test_ckpt_common import CkptCfg, build, model_config, seed_rank
from tests.trainer_utils import tiny_gpt_config, tiny_swin_config


def _swin(cp: int, cp_method: str = "ring"):
    return tiny_swin_config("/nonexistent", "/nonexistent", parallel={"cp": cp, "cp_method": cp_method})


@pytest.mark.parametrize("cp_method", ["ring", "ulysses"])
def test_a_swin_records_the_ulysses_its_cp_runs(cp_method):
    assert layout_dict(_swin(2, cp_method), 2)["cp_method"] == "ulysses"
    assert recorded_layouts(_swin(2, cp_method), 2) == [{**layout_dict(_swin(2), 2), "cp_method": "ring"}]
    # cp 1 runs no cp: the record stays the configured value, as every checkpoint so far has it
    assert layout_dict(_swin(1, cp_method), 1)["cp_method"] == cp_method and recorded_layouts(_swin(1), 1) == []


@pytest.mark.parametrize("parallel", [{}, {"cp": 2}, {"cp": 2, "cp_method": "ulysses"},
                                      {"cp": 4, "cp_method": "hybrid", "ulysses_degree": 2}, {"tp": 2, "dp": 2}],
                         ids=["base", "cp2_ring", "cp2_ulysses", "cp4_hybrid", "tp2_dp2"])
def test_a_gpt_layout_is_what_it_always_recorded(parallel):
    cfg = tiny_gpt_config("/nonexistent", parallel=dict(parallel))
    p = cfg.parallel
    assert layout_dict(cfg, 4) == {"dp": p.dp, "tp": p.tp, "pp": p.pp, "cp": p.cp, "wp": [1, 1],
                                   "cp_layout": p.cp_layout, "cp_method": p.cp_method, "zero_stage": p.zero_stage,
                                   "fsdp": p.fsdp, "world_size": 4}
    assert recorded_layouts(cfg, 4) == []


def _save_and_resume(tmp_path, saved_layout: dict, layout: dict, same_layouts) -> bool:
    """Save a checkpoint recorded with ``saved_layout``, scramble the RNG, resume with ``layout``: whether the
    torch RNG came back to the state it was saved with."""
    seed_rank(0)
    model, opt, sched = build()
    root = tmp_path / "ckpt"
    saver = CheckpointManager(CkptCfg(dir=str(root)), run_dir=tmp_path, config=model_config(), layout=saved_layout)
    assert saver.save(1, model, opt, sched, extra={"step": 1, "consumed_samples": 2})
    expected = torch.rand(4)  # the draws that follow the saved state
    torch.manual_seed(987)
    loader = CheckpointManager(CkptCfg(dir=str(root)), run_dir=tmp_path, config=model_config(), layout=layout,
                               same_layouts=same_layouts)
    assert loader.resume(model, opt, sched)["step"] == 1
    return torch.equal(torch.rand(4), expected)


def test_an_old_swin_cp_checkpoint_recorded_as_ring_resumes_its_rng_states(tmp_path):
    cfg = _swin(2)
    old = {**layout_dict(cfg, 2), "cp_method": "ring"}  # what the trainer recorded for this run before
    assert _save_and_resume(tmp_path / "old", old, layout_dict(cfg, 2), recorded_layouts(cfg, 2))
    assert _save_and_resume(tmp_path / "new", layout_dict(cfg, 2), layout_dict(cfg, 2), recorded_layouts(cfg, 2))
    # the check can fail: without the older record the new layout differs and the RNG is left as it is
    assert not _save_and_resume(tmp_path / "bare", old, layout_dict(cfg, 2), ())
    # and another layout still does not restore them (a different cp)
    assert not _save_and_resume(tmp_path / "other", {**old, "cp": 4}, layout_dict(cfg, 2), recorded_layouts(cfg, 2))


def test_a_resume_into_another_layout_names_only_the_entries_that_changed():
    """The warning of a resharding resume said ``saved with layout {...10 entries...}, loading with {...}``: two dicts
    to diff by eye. It names the changed entries instead."""
    dp2 = layout_dict(tiny_gpt_config("/nonexistent", parallel={"dp": 2}), 2)
    cp2 = layout_dict(tiny_gpt_config("/nonexistent", parallel={"dp": 1, "cp": 2}), 2)
    assert layout_changes(dp2, cp2) == "dp 2 -> 1, cp 1 -> 2"
    assert layout_changes(None, cp2).startswith("None -> {")  # a checkpoint that recorded no layout
