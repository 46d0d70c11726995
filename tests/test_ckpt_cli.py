"""`dist-train ckpt inspect|verify|convert` through their run(args) functions, and the HF round trip."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_train import checkpoint_arguments
from dist_train.checkpoint import CheckpointManager, read_manifest
from dist_train.checkpoint import cli
from dist_train.cli import main
from dist_train.checkpoint.hf import from_hf_name, to_hf_name
from tests.test_ckpt_common import (D, FFN, HEADS, KV_HEADS, LAYERS, VOCAB, CkptCfg, build, eval_outputs, flip_byte,
                                    model_config, seed_rank, shard_files, train_steps)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-train ckpt", formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoint_arguments.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def saved(tmp_path):
    """A checkpoint dir with step_3 (trained model + optimizer); returns (root, model)."""
    seed_rank(0)
    model, opt, sched = build()
    train_steps(model, opt, sched, 1, 3)
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(CkptCfg(dir=str(root)), run_dir=tmp_path, config=model_config(),
                            layout={"dp": 1, "tp": 1, "pp": 1, "cp": 1, "wp": [1, 1], "zero_stage": None,
                                    "world_size": 1})
    mgr.save(3, model, opt, sched, extra={"step": 3, "consumed_samples": 18})
    return root, model


def test_inspect_and_verify(saved, capsys, tmp_path):
    root, _ = saved
    assert cli.run(_parse("inspect", str(root), "--json", str(tmp_path / "t.json"))) == 0
    out = capsys.readouterr().out
    for needle in ("step_3", "step        3", f"model       gpt: d_model {D}, n_layers {LAYERS}, n_heads {HEADS}, "
                   f"ffn_hidden {FFN}, n_kv_heads {KV_HEADS}, vocab_size {VOCAB}", "dp=1", "__0_0.distcp", ".metadata", "rng_rank00000.json",
                   "model.layers.0.attention.wq.weight", f"{D}x{D}", "float32", "optim.state.*.exp_avg_sq "):
        assert needle in out, (needle, out)
    # the optimizer state is one line per kind (a large model's table was two thirds Adam moments); --all lists it
    n_model = sum(line.lstrip().startswith("model.") for line in out.splitlines())
    assert "optim.state.norm.weight.exp_avg" not in out and "--all lists each tensor" in out
    assert f"{n_model} tensors" in next(line for line in out.splitlines() if "optim.state.*.exp_avg_sq" in line)
    assert cli.run(_parse("inspect", str(root), "--all")) == 0
    every = capsys.readouterr().out
    assert "optim.state.norm.weight.exp_avg " in every and "optim.state.*" not in every
    assert len(every.splitlines()) > len(out.splitlines())
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["step"] == 3 and any(r["name"] == "model.tok_embeddings.weight" and r["shape"] == [VOCAB, D]
                                       for r in table["tensors"])

    assert cli.run(_parse("verify", str(root))) == 0
    assert "OK" in capsys.readouterr().out
    shard = shard_files(root / "step_3")[0]
    flip_byte(shard, offset=shard.stat().st_size - 100)
    assert cli.run(_parse("verify", str(root / "step_3"))) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and shard.name in out and "tensor" in out, out
    (root / "step_3" / "train_state.json").unlink()
    assert cli.run(_parse("verify", str(root))) == 1
    assert "train_state.json: missing" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no such checkpoint"):
        cli.run(_parse("inspect", str(tmp_path / "nowhere")))
    for action in ("inspect", "verify"):  # a step that does not exist is named, with the ones that do
        with pytest.raises(ValueError, match=r"step_20: no such checkpoint .*holds step_3"):
            cli.run(_parse(action, str(root / "step_20")))


def test_hf_names_and_shapes_follow_llama_spec():
    assert to_hf_name("layers.3.feed_forward.w1.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert to_hf_name("layers.0.feed_forward.w3.weight") == "model.layers.0.mlp.up_proj.weight"
    assert to_hf_name("layers.11.attention.wo.weight") == "model.layers.11.self_attn.o_proj.weight"
    assert from_hf_name("model.layers.2.post_attention_layernorm.weight") == "layers.2.ffn_norm.weight"
    with pytest.raises(ValueError, match="q_proj.bias"):
        from_hf_name("model.layers.0.self_attn.q_proj.bias")


def test_convert_to_hf_and_back_is_bitwise(saved, capsys, tmp_path):
    root, model = saved
    hf_dir, back = tmp_path / "hf", tmp_path / "from_hf"
    assert cli.run(_parse("convert", str(root), "--to", "hf", str(hf_dir))) == 0
    assert "model.safetensors" in capsys.readouterr().out
    tensors = load_file(str(hf_dir / "model.safetensors"))
    config = json.loads((hf_dir / "config.json").read_text())
    dh = D // HEADS
    expected_shapes = {"model.embed_tokens.weight": [VOCAB, D], "model.norm.weight": [D], "lm_head.weight": [VOCAB, D]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        expected_shapes.update({p + "input_layernorm.weight": [D], p + "post_attention_layernorm.weight": [D],
                                p + "self_attn.q_proj.weight": [HEADS * dh, D],
                                p + "self_attn.k_proj.weight": [KV_HEADS * dh, D],
                                p + "self_attn.v_proj.weight": [KV_HEADS * dh, D],
                                p + "self_attn.o_proj.weight": [D, HEADS * dh],
                                p + "mlp.gate_proj.weight": [FFN, D], p + "mlp.up_proj.weight": [FFN, D],
                                p + "mlp.down_proj.weight": [D, FFN]})
    assert {k: list(v.shape) for k, v in tensors.items()} == expected_shapes
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["num_hidden_layers"], config["vocab_size"]) == \
        (D, FFN, HEADS, KV_HEADS, LAYERS, VOCAB)
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-5
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], model.layers[1].attention.wk.weight)

    assert cli.run(_parse("convert", str(hf_dir), "--from", "hf", str(back))) == 0
    assert "checkpoint.resume=" in capsys.readouterr().out
    body = read_manifest(back / "step_0")
    assert body["step"] == 0 and body["contents"] == ["model"] and body["config"]["model"]["n_kv_heads"] == KV_HEADS
    # resume from the converted checkpoint: weights bitwise equal, optimizer left fresh, step 0
    seed_rank(0)
    fresh, opt, sched = build(seed=5)
    mgr = CheckpointManager(CkptCfg(resume=str(back)), run_dir=tmp_path / "new_run", config=model_config(),
                            layout={"world_size": 1})
    assert mgr.resume(fresh, opt, sched) == {"step": 0, "consumed_samples": 0}
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(eval_outputs(fresh), eval_outputs(model)) and not opt.state
    # and back to HF again: the same bytes
    assert cli.run(_parse("convert", str(back), "--to", "hf", str(tmp_path / "hf2"))) == 0
    again = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)

    # never over what is there: an HF export over an earlier one, an import into a checkpoint directory (its
    # step_0 would prune the trained checkpoints) — one line each, nothing written
    with pytest.raises(ValueError, match="already holds model.safetensors and config.json"):
        cli.run(_parse("convert", str(back), "--to", "hf", str(hf_dir)))
    with pytest.raises(ValueError, match="is a file"):
        cli.run(_parse("convert", str(back), "--to", "hf", str(hf_dir / "config.json")))
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        cli.run(_parse("convert", str(hf_dir), "--from", "hf", str(root)))
    assert sorted(p.name for p in root.iterdir()) == before
    (hf_dir / "tokenizer.json").write_text("{}")  # other files beside an export are fine
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "config.json").unlink()
    assert cli.run(_parse("convert", str(back), "--to", "hf", str(hf_dir))) == 0


@pytest.mark.parametrize("direction", [["--to", "hf"], ["--from", "hf"], ["--from", "dcp"]])
def test_convert_refuses_set_without_a_config_it_would_override(direction, tmp_path, capsys):
    """`--set` overrides a --config key (--from dcp); without --config nothing read it and the conversion went on
    as if it were not given. Refused in one line before anything is read or written."""
    out = tmp_path / "out"
    assert main(["ckpt", "convert", str(tmp_path / "src"), *direction, str(out), "--set", "model.d_model=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set model.d_model=64: --set overrides a --config key" in err, err
    assert not out.exists()
