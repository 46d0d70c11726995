"""Conversion between dist-train checkpoints and Hugging Face ``LlamaForCausalLM`` directories.

    to_hf("runs/x/checkpoints/step_100", "out_hf")          # model.safetensors + config.json
    from_hf("hf_model_dir", "runs/y/init")                   # runs/y/init/step_0/ (+ latest): weights only

Names (the GPT's parameters ↔ HF): tok_embeddings ↔ model.embed_tokens; layers.i.attention_norm ↔
model.layers.i.input_layernorm; attention.w{q,k,v,o} ↔ self_attn.{q,k,v,o}_proj; ffn_norm ↔
post_attention_layernorm; feed_forward.w1/w3/w2 ↔ mlp.gate/up/down_proj; norm ↔ model.norm; output ↔
lm_head (absent when embeddings are tied). RoPE is the HF rotate_half convention on both sides, so q/k
need no permutation; tensors are copied bit for bit.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed.checkpoint as dcp

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.storage import CheckpointError, SafeReader

PathLike = Union[str, Path]

_LAYER = r"layers\.(\d+)\."
# (dist-train name, HF name); "{}" is the layer index
_RULES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight"),
    ("layers.{}.attention.wq.weight", "model.layers.{}.self_attn.q_proj.weight"),
    ("layers.{}.attention.wk.weight", "model.layers.{}.self_attn.k_proj.weight"),
    ("layers.{}.attention.wv.weight", "model.layers.{}.self_attn.v_proj.weight"),
    ("layers.{}.attention.wo.weight", "model.layers.{}.self_attn.o_proj.weight"),
    ("layers.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight"),
    ("layers.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight"),
    ("layers.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight"),
    ("layers.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]


def _rename(name: str, src: int, unknown: str) -> str:
    """Map ``name`` from side ``src`` (0 = dist-train, 1 = HF) to the other side; ValueError(unknown) when
    no rule matches."""
    for rule in _RULES:
        m = re.fullmatch(re.escape(rule[src]).replace(r"\{\}", r"(\d+)"), name)
        if m:
            return rule[1 - src].format(*m.groups())
    raise ValueError(unknown)


def to_hf_name(name: str) -> str:
    return _rename(name, 0, f"parameter '{name}' has no Hugging Face Llama name (expected GPT names such as "
                            "tok_embeddings.weight, layers.0.attention.wq.weight, norm.weight, output.weight)")


def from_hf_name(name: str) -> str:
    return _rename(name, 1, f"Hugging Face tensor '{name}' is not a LlamaForCausalLM weight this converter knows "
                            "(biases, rotary caches and other architectures are not supported)")


def load_model_tensors(ckpt: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify ``ckpt`` and read its full (unsharded) model tensors in this process: ({fqn: tensor}, manifest)."""
    ckpt = Path(ckpt)
    problems = mf.verify_checkpoint(ckpt)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} failed verification: {problems[0]}")
    body = mf.read_manifest(ckpt)
    keys = {k: v for k, v in body["tensors"].items() if k.startswith("model.")}
    state = {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in keys.items()}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeReader(ckpt), no_dist=True)
    return {k[len("model."):]: v for k, v in state.items()}, body


def hf_config(tensors: dict[str, torch.Tensor], model_cfg: dict, seq_len: int) -> dict:
    """LlamaForCausalLM config.json from the weights' shapes + the saved model config (heads, eps, theta)."""
    if not model_cfg.get("n_heads"):
        raise ValueError("the checkpoint's saved config has no model.n_heads; cannot write an HF config")
    vocab, d = tensors["tok_embeddings.weight"].shape
    n_layers = len({int(m.group(1)) for k in tensors if (m := re.match(_LAYER, k))})
    heads = int(model_cfg["n_heads"])
    head_dim = d // heads
    kv = tensors["layers.0.attention.wk.weight"].shape[0] // head_dim
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": d, "intermediate_size": tensors["layers.0.feed_forward.w1.weight"].shape[0],
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "num_hidden_layers": n_layers, "vocab_size": vocab,
        "rms_norm_eps": float(model_cfg.get("norm_eps", 1e-5)),
        "rope_theta": float(model_cfg.get("rope_theta", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": int(seq_len), "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(tensors["tok_embeddings.weight"].dtype).replace("torch.", ""),
    }


def to_hf(ckpt: PathLike, out: PathLike) -> Path:
    """Write ``out/model.safetensors`` + ``out/config.json`` from a (verified) dist-train checkpoint."""
    from safetensors.torch import save_file

    tensors, body = load_model_tensors(ckpt)
    cfg = body.get("config") or {}
    model_cfg = cfg.get("model") or {}
    if model_cfg.get("kind", "gpt") != "gpt":
        raise ValueError(f"checkpoint {ckpt} holds a '{model_cfg.get('kind')}' model; only gpt converts to HF")
    config = hf_config(tensors, model_cfg, (cfg.get("data") or {}).get("seq_len", 2048))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({to_hf_name(k): v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": f"dist-train {Path(ckpt).name}"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def from_hf(hf_dir: PathLike, out: PathLike) -> Path:
    """Write a dist-train checkpoint ``out/step_0`` (weights only, step 0) from an HF Llama directory
    (``config.json`` + one or more ``*.safetensors``). Start pretraining from it with
    ``--set checkpoint.resume=OUT`` (the model config must match ``config.json``)."""
    from safetensors.torch import load_file

    from dist_train.checkpoint.manager import CheckpointManager

    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    files = sorted(hf_dir.glob("*.safetensors"))
    if not cfg_path.is_file() or not files:
        raise ValueError(f"{hf_dir}: expected config.json and *.safetensors (an HF LlamaForCausalLM directory)")
    hf = json.loads(cfg_path.read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            tensors[from_hf_name(name)] = t
    if hf.get("tie_word_embeddings") and "output.weight" in tensors:
        del tensors["output.weight"]  # tied: the head is the embedding
    model_cfg = {"kind": "gpt", "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
                 "n_heads": hf["num_attention_heads"],
                 "n_kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
                 "ffn_hidden": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
                 "rope_theta": hf.get("rope_theta", 10000.0), "norm_eps": hf.get("rms_norm_eps", 1e-5),
                 "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
    _ckpt_cfg = type("ImportCfg", (), dict(every=0, keep_last=1, async_save=False, resume="none", dir=str(out),
                                          on_error="stop"))
    mgr = CheckpointManager(_ckpt_cfg, run_dir=Path(out), config={"model": model_cfg, "source": str(hf_dir)},
                            layout={"world_size": 1})
    mgr.save_tensors(0, tensors)
    return Path(out) / mf.step_dir_name(0)
