"""Shared pieces of the checkpoint tests (a tiny Llama-named GPT, a dp training loop) + no-process unit tests.

The model uses exactly the trainer's parameter names (tok_embeddings, layers.i.attention.wq, …) so the
HF conversion tests can use it; dropout makes every step RNG-dependent, so RNG restore is exercised.
"""
from __future__ import annotations

import math
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.checkpoint.state import from_json, to_json
from dist_train.config import CheckpointConfig
from dist_train.checkpoint.storage import CheckpointError, file_block_digests, load_dcp_metadata

VOCAB, D, LAYERS, HEADS, KV_HEADS, FFN, SEQ = 29, 16, 2, 4, 2, 24, 8
GLOBAL_BATCH = 6  # divisible by world sizes 1, 2, 3


# the real config dataclass; its defaults (keep_last 3, resume auto, at_end) are what these tests use
CkptCfg = CheckpointConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        dh = D // HEADS
        self.wq = nn.Linear(D, HEADS * dh, bias=False)
        self.wk = nn.Linear(D, KV_HEADS * dh, bias=False)
        self.wv = nn.Linear(D, KV_HEADS * dh, bias=False)
        self.wo = nn.Linear(HEADS * dh, D, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        dh = D // HEADS
        q = self.wq(x).view(b, s, HEADS, dh).transpose(1, 2)
        k = self.wk(x).view(b, s, KV_HEADS, dh).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
        v = self.wv(x).view(b, s, KV_HEADS, dh).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, HEADS * dh))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(D, FFN, bias=False)
        self.w3 = nn.Linear(D, FFN, bias=False)
        self.w2 = nn.Linear(FFN, D, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(D), Attention()
        self.ffn_norm, self.feed_forward = RMSNorm(D), FeedForward()

    def forward(self, x):
        x = x + F.dropout(self.attention(self.attention_norm(x)), 0.2, self.training)
        return x + self.feed_forward(self.ffn_norm(x))


class TinyGPT(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(D)
        self.output = None if tie else nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return x @ self.tok_embeddings.weight.t() if self.output is None else self.output(x)


def model_config() -> dict:
    """The cfg.to_dict() shape the manifest carries (used by the HF converter)."""
    return {"model": {"kind": "gpt", "d_model": D, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
                      "ffn_hidden": FFN, "vocab_size": VOCAB, "rope_theta": 10000.0, "norm_eps": 1e-5,
                      "tie_embeddings": False},
            "data": {"seq_len": SEQ}}


def build(seed: int = 0):
    """(model, AdamW, LambdaLR) built deterministically from ``seed``."""
    torch.manual_seed(seed)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * (0.5 + 0.5 * math.cos(s / 7)))
    return model, opt, sched


def seed_rank(rank: int, seed: int = 1234) -> None:
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed(seed + rank)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def fixed_batch() -> torch.Tensor:
    return batch(-1)[:, :SEQ]


def train_steps(model, opt, sched, first: int, last: int, rank: int = 0, world: int = 1) -> list[float]:
    """Steps ``first..last`` (inclusive) of dp training: each rank takes its slice of the global batch,
    gradients are averaged over ranks; the python/numpy RNGs perturb the data so their restore matters too.
    Returns the global mean loss of each step (identical on every rank)."""
    losses = []
    per = GLOBAL_BATCH // world
    model.train()
    for step in range(first, last + 1):
        data = batch(step)
        shift = random.randrange(VOCAB) + int(np.random.randint(VOCAB))  # python + numpy RNG in the data path
        data = (data + shift) % VOCAB
        x, y = data[rank * per:(rank + 1) * per, :-1], data[rank * per:(rank + 1) * per, 1:]
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        total = loss.detach().clone()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            dist.all_reduce(total)
        losses.append(float(total) / world)
        opt.step()
        sched.step()
    return losses


def eval_outputs(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(fixed_batch())


def flip_byte(path: Path, offset: Optional[int] = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def shard_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.distcp"))


# ---------------------------------------------------------------------------------------------
# No-process unit tests
# ---------------------------------------------------------------------------------------------
def test_json_round_trip_of_non_tensor_state():
    values = {"betas": (0.9, 0.95), "nan": float("nan"), "inf": float("-inf"), "none": None, "flag": True,
              "nested": {"a": [1, (2, 3)], 4: "int key"}, "raw": b"\x00\xff",
              "t": torch.tensor([1.5, -2.0], dtype=torch.float64), "rng": np.random.get_state()}
    back = from_json(to_json(values))
    assert back["betas"] == (0.9, 0.95) and isinstance(back["betas"], tuple)
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")
    assert back["nested"] == {"a": [1, (2, 3)], 4: "int key"}
    assert back["raw"] == b"\x00\xff" and back["flag"] is True and back["none"] is None
    assert torch.equal(back["t"], values["t"]) and back["t"].dtype == torch.float64
    assert back["rng"][0] == "MT19937" and np.array_equal(back["rng"][1], values["rng"][1])
    assert back["rng"][2:] == values["rng"][2:]
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        to_json(object(), "opt.weird")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_metadata_unpickler_refuses_foreign_globals(tmp_path):
    bad = tmp_path / ".metadata"
    bad.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="builtins.print' is not allowed"):
        load_dcp_metadata(bad)
    # a DCP checkpoint with a pickled (non-tensor) entry is refused as a whole
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(2), "obj": {"x": 1}}, checkpoint_id=tmp_path / "c", no_dist=True)
    with pytest.raises(CheckpointError, match="BytesStorageMetadata' is not allowed"):
        load_dcp_metadata(tmp_path / "c" / ".metadata")
    dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "d", no_dist=True)
    md = load_dcp_metadata(tmp_path / "d" / ".metadata")
    assert list(md.state_dict_metadata) == ["w"]


@pytest.mark.parametrize("name", ["../secret.txt", "{outside}", "sub/../../secret.txt"])
def test_a_manifest_listing_a_file_outside_its_directory_is_refused(name, tmp_path):
    """The manifest's self-checksum is no signature: one rewritten elsewhere listed a file outside the checkpoint
    with that file's true record, and verification read it and called the checkpoint valid."""
    secret = tmp_path / "ckpts" / "secret.txt"
    mgr = CheckpointManager(CheckpointConfig(dir=str(secret.parent)), run_dir=tmp_path)
    mgr.save_tensors(1, {"w": torch.ones(3)})
    mgr.close()
    secret.write_text("not the checkpoint's")
    ckpt = secret.parent / "step_1"
    body = mf.read_manifest(ckpt)
    name = name.format(outside=secret)
    body["files"][name] = file_block_digests(secret)
    mf.write_manifest(ckpt, body)
    problems = mf.verify_checkpoint(ckpt)
    assert len(problems) == 1 and repr(name) in problems[0] and "not a plain file name" in problems[0], problems
    with pytest.raises(CheckpointError, match="not a plain file name"):
        mf.read_manifest(ckpt)
