"""Packed documents in training: the batcher's boundaries, positions and loss mask (Megatron semantics),
and cp=2 (every layout, Ulysses) and pp = 2, 3 (1F1B, GPipe, interleaved; the pipeline's micro-batches
smaller than the accumulation micro-batches) with ``data.document_mask`` (and ``reset_positions``) train
exactly like one rank with the same options."""
import pytest
import torch

from dist_train.config import ConfigError, config_from_dict
from dist_train.data.batches import TokenBatcher
from dist_train.data.documents import DocumentOptions
from dist_train.models.gpt import IGNORE_INDEX
from dist_train.trainer import train
from parallelism.context import sequence_positions
from tests.dist_harness import run_ranks
from tests.trainer_utils import losses_and_valid, rel_close, tiny_gpt_config

EOD = 3
# vocab 8: the synthetic progression hits the EOD id every few tokens, so samples pack several documents
DOCS = {"seq_len": 30, "document_mask": True, "eod_id": EOD}
MODEL = {"vocab_size": 8}
CASES = [
    {"cp": 2, "cp_layout": "contiguous", "cp_method": "ring"},
    {"cp": 2, "cp_layout": "striped", "cp_method": "ring"},
    {"cp": 2, "cp_layout": "zigzag", "cp_method": "ring"},
    {"cp": 2, "cp_layout": "zigzag", "cp_method": "ulysses"},
]


class _Fixed:
    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, i):
        return self.rows[i % len(self.rows)]


def test_batcher_boundaries_positions_and_loss_mask():
    #           0  1  2  3  4  5  6  7  8     (EOD at 2 and 5: documents [0,3), [3,6), [6,9))
    row = torch.tensor([7, 1, EOD, 4, 4, EOD, 6, 6, 6, 2])
    opts = DocumentOptions(EOD, document_mask=True, reset_positions=True, eod_mask_loss=True)
    b = TokenBatcher(_Fixed([row]), micro_batch=1, dp=1, dp_rank=0, documents=opts).microbatch(0, 0)
    assert b["cu_seqlens"].tolist() == [[0, 3, 6, 9]]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2]]
    # the label after each EOD (the next document's first token) is ignored, the EOD label itself is kept
    assert b["labels"].tolist() == [[1, EOD, IGNORE_INDEX, 4, EOD, IGNORE_INDEX, 6, 6, 2]]
    # zigzag cp=2 pads 9 -> 12 tokens: the padding is its own document; positions follow the shard
    for rank in (0, 1):
        z = TokenBatcher(_Fixed([row]), micro_batch=1, dp=1, dp_rank=0, cp=2, cp_rank=rank, layout="zigzag",
                         documents=opts).microbatch(0, 0)
        pos = sequence_positions(12, rank=rank, world_size=2, layout="zigzag")
        assert z["cu_seqlens"].tolist() == [[0, 3, 6, 9, 12]]
        assert z["positions"].tolist() == [[[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2][p] for p in pos]]
    plain = TokenBatcher(_Fixed([row]), micro_batch=1, dp=1, dp_rank=0,
                         documents=DocumentOptions(EOD)).microbatch(0, 0)
    assert "cu_seqlens" not in plain and plain["positions"].tolist() == list(range(9))


def test_document_options_are_refused_where_they_cannot_apply(tmp_path):
    with pytest.raises(ConfigError, match="data.reset_positions = true with model.kind = swin"):
        config_from_dict({"run": {"name": "s", "dir": str(tmp_path)}, "model": {"kind": "swin"},
                          "data": {"source": "weather", "reset_positions": True}})


def _cases(rank, world, root, cases, data):
    return [train(tiny_gpt_config(f"{root}/{i}", parallel=par, model=MODEL, data=data)).losses
            for i, par in enumerate(cases)]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """``one_rank(model, data, train)``: the result of the one-rank run of that tiny GPT, trained once for the
    module (the runs without documents, and the pipelines' references, were trained again by every test that
    compared with them)."""
    root, runs = tmp_path_factory.mktemp("one_rank"), {}

    def run(model: dict, data: dict, train_over: dict | None = None):
        key = repr((model, data, train_over))
        if key not in runs:
            runs[key] = train(tiny_gpt_config(root / str(len(runs)), model=model, data=data, train=train_over or {}))
        return runs[key]
    return run


@pytest.mark.parametrize("extra", [{}, {"reset_positions": True}], ids=["mask", "mask+reset_positions"])
def test_cp2_with_documents_matches_cp1(tmp_path, extra, one_rank):
    data = {**DOCS, **extra}
    ref = train(tiny_gpt_config(tmp_path / "ref", model=MODEL, data=data)).losses
    unmasked = one_rank(MODEL, {"seq_len": 30}).losses
    assert not rel_close(ref, unmasked, 1e-3), "document_mask changed nothing: the data has no EOD tokens"
    ranks = run_ranks(_cases, 2, args=(str(tmp_path), CASES, data), timeout=240)
    for losses_per_case in ranks:
        for par, losses in zip(CASES, losses_per_case):
            assert rel_close(losses, ref, 1e-5), (par, extra, losses, ref)


# (name, model, parallel, train) per world size: each pipeline micro-batch must attend and rotate with its own
# samples' boundaries and positions (1F1B / interleaved run them out of order, interleaved with backwards)
PP_DOCS = {**DOCS, "reset_positions": True, "eod_mask_loss": True}
EVAL = {"eval_every": 5, "eval_steps": 1}  # + the validation loss after step 5 (the schedule's eval pass)
FOUR_LAYERS = {**MODEL, "n_layers": 4}
PP_CASES = {
    2: [("pp2_1f1b", MODEL, {"pp": 2}, {}),
        # full recompute in 1F1B's backward: the layers rerun on saved inputs (positions/boundaries already sliced),
        # while the stage's micro_index already names a later micro-batch
        ("pp2_1f1b_4micro_full_ckpt", MODEL, {"pp": 2, "microbatches": 4}, {"activation_checkpointing": "full"}),
        ("pp2_gpipe_full_ckpt", MODEL, {"pp": 2, "pp_schedule": "gpipe"}, {"activation_checkpointing": "full"}),
        ("pp2_interleaved", FOUR_LAYERS, {"pp": 2, "pp_schedule": "interleaved", "microbatches": 4}, {})],
    3: [("pp3", FOUR_LAYERS, {"pp": 3, "microbatches": 4}, {"micro_batch": 1})],
    # cp inside pp: the cp shard's positions, the global boundaries; dp: each dp rank its own samples' rows
    4: [("pp2_cp2_zigzag", MODEL, {"pp": 2, "cp": 2}, {}),
        ("pp2_cp2_ulysses_interleaved", FOUR_LAYERS, {"pp": 2, "cp": 2, "cp_method": "ulysses",
                                                      "pp_schedule": "interleaved", "microbatches": 2}, {}),
        ("pp2_dp2", MODEL, {"pp": 2, "dp": 2, "microbatches": 2}, {"micro_batch": 1})],
}


def _pp_cases(rank, world, root, cases):
    out = {}
    for name, model, par, train_over in cases:
        res = train(tiny_gpt_config(f"{root}/{name}", model=model, parallel=par, data=PP_DOCS,
                                    train={**EVAL, **train_over}))
        out[name] = (losses_and_valid(res), res.grad_norms)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_pipeline_with_documents_matches_one_rank(tmp_path, world, one_rank):
    refs = {}
    for name, model, _, _ in PP_CASES[world]:
        key = model.get("n_layers", 2)
        if key not in refs:
            res = one_rank(model, PP_DOCS, EVAL)
            refs[key] = (losses_and_valid(res), res.grad_norms)
    model = PP_CASES[world][0][1]
    plain = one_rank(model, {"seq_len": 30}).losses
    assert not rel_close(refs[model.get("n_layers", 2)][0][:5], plain, 1e-3), \
        "the documents changed nothing: the data has no EOD tokens"
    for out in run_ranks(_pp_cases, world, args=(str(tmp_path), PP_CASES[world]), timeout=240):
        for name, model, _, _ in PP_CASES[world]:
            losses, norms = out[name]
            ref_losses, ref_norms = refs[model.get("n_layers", 2)]
            assert len(ref_losses) == 6, ref_losses  # 5 steps + the validation loss
            assert rel_close(losses, ref_losses, 1e-5), (name, losses, ref_losses)
            assert rel_close(norms, ref_norms, 1e-5), (name, norms, ref_norms)


def test_flops_count_sum_of_document_lengths_squared():
    from dist_train.cost.flops import Throughput, document_keys

    # causal: a document of L tokens attends (L+1)/2 keys per query on average; padding is not counted
    assert document_keys([[0, 4, 10], [0, 4, 10, 12]], 10, None) == (2 * (4 * 2.5 + 6 * 3.5), 20)
    # window 2 (keys i-2..i): the 6-token document sees 1, 2, 3, 3, 3, 3 keys
    assert document_keys([[0, 4, 10]], 10, 2) == (1 + 2 + 3 + 3 + 15, 10)
    thr = Throughput(flops_step=1e12, tokens_step=1000, world_size=2, peak_tflops=1.0,
                     flops_per_key=1e6, keys_per_query=500.5)
    assert thr.metrics(1.0, 500.5) == thr.metrics(1.0)
    # 8 equal documents of S=1000: S_eff (125+1)/2 instead of (1000+1)/2
    packed = thr.tflops_per_device(1.0, 63.0)
    assert abs(packed - (1e12 - 1000 * 1e6 * (500.5 - 63.0)) / 2 / 1e12) < 1e-12
