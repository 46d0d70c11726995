"""Conversion between dist-train GPT checkpoints and Hugging Face ``LlamaForCausalLM`` /
``MistralForCausalLM`` directories, refusing (one line) whatever would silently change the model.

    to_hf("runs/x/checkpoints/step_100", "out_hf")          # model.safetensors + config.json (an HFExport)
    from_hf("hf_model_dir", "runs/y/init")                   # runs/y/init/step_0/ (+ latest): weights only

Names (the GPT's parameters ↔ HF): tok_embeddings ↔ model.embed_tokens; layers.i.attention_norm ↔
model.layers.i.input_layernorm; attention.w{q,k,v,o} ↔ self_attn.{q,k,v,o}_proj; ffn_norm ↔
post_attention_layernorm; feed_forward.w1/w3/w2 ↔ mlp.gate/up/down_proj; norm ↔ model.norm; output ↔
lm_head (absent when embeddings are tied). RoPE is the HF rotate_half convention on both sides, so q/k
need no permutation; tensors are copied bit for bit.

Config: every config.json field is in exactly one of MAPPED (becomes a ``model.*`` key), REQUIRED (must
hold the one value dist-train computes, else refused), KEPT (no effect on the computed function; kept in
the checkpoint and written back on export) or IGNORED (same, with the reason); any other field is
refused. RoPE is read from transformers ≥ 5's ``rope_parameters`` or the older top-level ``rope_theta`` /
``rope_scaling``; default and llama3 RoPE convert, other scalings are refused. A sliding window: HF's
``sliding_window = n`` lets a query see n keys (itself included), dist-train's ``attention_window = w``
sees w + 1, so w = n - 1; a windowed model exports as MistralForCausalLM.

Tokenizer: the ids mean the tokens of one tokenizer. An import records the fingerprint of a ``tokenizer.json``
beside the weights, else of a sentencepiece ``tokenizer.model`` (``train_tokenizer`` in the step-0 checkpoint's
extra), so a fine-tune on data prepared with
another tokenizer is refused (``compat.check_tokenizer``). An export names the checkpoint's tokenizer fingerprint in
the safetensors metadata (``tokenizer``), copies the tokenizer.json the training data's sidecar names when it still
has that fingerprint (with the ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it: the special tokens
``AutoTokenizer`` reads), and refuses a ``tokenizer.json`` already in the output directory with another fingerprint.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.manager import CheckpointManager, checkpoint_extra, quiet_single_process, trained_tokenizer
from dist_train.checkpoint.storage import CheckpointError, SafeReader
from dist_train.config import (LLAMA3_ROPE_KEYS, CheckpointConfig, ConfigError, ModelConfig, attention_head_dim,
                               ffn_hidden_size, validate_rope_scaling)
from dist_train.data.sidecar import read_sidecar
from dist_train.data.tokenizer import (BYTE_FINGERPRINT, SENTENCEPIECE_FILE, TOKENIZER_FILE, fingerprints_differ,
                                      hf_dir_fingerprint, tokenizer_fingerprint)
from dist_train.models.gpt import rope_inv_freq

PathLike = Union[str, Path]
#: Files beside a tokenizer.json in an HF directory that ``AutoTokenizer.from_pretrained`` reads for the special tokens
#: (bos/eos/pad/unk, chat template): an export copies them with it, or the exported tokenizer would have none.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")

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

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

# config.json field -> the model.* key(s) it becomes
MAPPED = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "intermediate_size": "ffn_hidden",
    "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim", "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "init_std",
    "rope_parameters": "rope_theta + rope_scaling (transformers >= 5)",
    "rope_theta": "rope_theta (transformers < 5)", "rope_scaling": "rope_scaling (transformers < 5)",
    "sliding_window": "attention_window = sliding_window - 1 (mistral; llama: must be null)",
    "use_sliding_window": "checked: not read by transformers' Llama/Mistral (false beside a window is refused)",
    "model_type": "llama or mistral (checked)", "architectures": "LlamaForCausalLM or MistralForCausalLM (checked)",
}
# field -> the values dist-train computes, the first is what export writes (a missing field has HF's default,
# which is the first); transformers maps "swish" to the same SiLU
REQUIRED = {"hidden_act": ("silu", "swish"), "attention_bias": (False,), "mlp_bias": (False,),
            "attention_dropout": (0.0,), "is_encoder_decoder": (False,)}
# fields with no effect on the computed function, carried through import -> export
KEPT = {
    "max_position_embeddings": "default RoPE has no length limit (llama3's original_max_position_embeddings is "
                               "mapped); dist-train trains at data.seq_len",
    "bos_token_id": "a tokenizer property (the dataset sidecar records the end-of-document id)",
    "eos_token_id": "a tokenizer property (the dataset sidecar records the end-of-document id)",
    "pad_token_id": "a tokenizer property; dist-train masks padding with label -100",
}
IGNORED = {
    "dtype": "storage dtype: the tensors carry their own", "torch_dtype": "storage dtype (transformers < 5 name)",
    "use_cache": "inference KV-cache switch", "output_attentions": "inference output switch",
    "output_hidden_states": "inference output switch", "return_dict": "inference output switch",
    "transformers_version": "writer's version", "_name_or_path": "where the writer loaded it from",
    "id2label": "sequence-classification heads only", "label2id": "sequence-classification heads only",
    "problem_type": "sequence-classification heads only",
    "chunk_size_feed_forward": "evaluates the FFN in chunks: the same function",
    "pretraining_tp": "splits the matmuls in slices (transformers < 5): the same function",
}


#: transformers' class defaults of the fields the import reads: config.json may omit any field, and transformers
#: then builds the model with its default (a Mistral without sliding_window has a 4096-key window), so the import
#: reads a missing field the same way (tests/test_hf_interop.py checks each against a load by transformers)
_SHARED_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": None, "head_dim": None, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False, "initializer_range": 0.02, "sliding_window": None}
HF_DEFAULTS = {
    "llama": {**_SHARED_DEFAULTS, "intermediate_size": 11008},
    "mistral": {**_SHARED_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8, "sliding_window": 4096},
}


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
                            "(biases and other architectures are not supported)")


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: full shape} of every parameter of the tp=1 GPT built from ``m``."""
    d, hd, ffn = m.d_model, attention_head_dim(m), ffn_hidden_size(m)
    q, kv = m.n_heads * hd, (m.n_kv_heads or m.n_heads) * hd
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (m.vocab_size, d), "norm.weight": (d,)}
    for i in range(m.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                       p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
                       p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q),
                       p + "feed_forward.w1.weight": (ffn, d), p + "feed_forward.w3.weight": (ffn, d),
                       p + "feed_forward.w2.weight": (d, ffn)})
    if not m.tie_embeddings:
        shapes["output.weight"] = (m.vocab_size, d)
    return shapes


def check_tensor_shapes(tensors: dict[str, torch.Tensor], want: dict[str, tuple], what: str, whose: str) -> None:
    """ValueError (one line) unless ``tensors`` have exactly the names and shapes of ``want`` (``whose``
    names the model they should be, for the message)."""
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"{what}: tensors do not match {whose} (missing {missing[:3] or 'none'}, "
                         f"unexpected {extra[:3] or 'none'})")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{what}: tensor {name} has shape {list(tensors[name].shape)}, {whose} has "
                             f"{list(shape)}")


def check_tensors(tensors: dict[str, torch.Tensor], m: ModelConfig, what: str) -> None:
    """ValueError (one line) unless ``tensors`` are exactly the GPT parameters of ``m`` with their shapes."""
    check_tensor_shapes(tensors, expected_shapes(m), what, "the model config")


def load_model_tensors(ckpt: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify ``ckpt`` and read its full (unsharded) model tensors in this process: ({fqn: tensor}, manifest)."""
    return load_checkpoint_tensors(ckpt, "model.")


def load_checkpoint_tensors(ckpt: PathLike, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Verify ``ckpt`` and read its full (unsharded) tensors whose key starts with ``prefix`` (``"model."``: the
    weights, ``"optim."``: the optimizer state, ``""``: all) in this process: ({key less prefix: tensor}, manifest)."""
    ckpt = Path(ckpt)
    problems = mf.verify_checkpoint(ckpt)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} failed verification: {problems[0]}")
    body = mf.read_manifest(ckpt)
    keys = {k: v for k, v in body["tensors"].items() if k.startswith(prefix)}
    state = {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in keys.items()}
    with quiet_single_process():
        dcp.load(state, storage_reader=SafeReader(ckpt), no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}, body


def saved_model_config(body: dict, what: str) -> ModelConfig:
    """The ModelConfig a checkpoint manifest records (missing keys: today's defaults)."""
    saved = (body.get("config") or {}).get("model") or {}
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{what}: saved model config has keys this version does not know: {', '.join(unknown)}")
    return ModelConfig(**saved)


# -- dist-train -> HF --------------------------------------------------------------------------
def _rope_to_hf(m: ModelConfig) -> dict:
    """Both RoPE layouts: transformers >= 5 reads rope_parameters, older versions rope_theta/rope_scaling."""
    scaling = dict(m.rope_scaling) if m.rope_scaling else None
    params = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if scaling:
        params = {**scaling, "rope_theta": float(m.rope_theta)}
    return {"rope_parameters": params, "rope_theta": float(m.rope_theta), "rope_scaling": scaling}


def hf_config(m: ModelConfig, dtype: torch.dtype, kept: Optional[dict] = None, seq_len: int = 2048,
              eos_token_id: Optional[int] = None) -> dict:
    """config.json for the GPT ``m``: LlamaForCausalLM, or MistralForCausalLM when it has a sliding window.
    kept: KEPT fields recorded at import (written back as they were); otherwise max_position_embeddings
    is ``seq_len`` and the token ids are ``eos_token_id`` / null."""
    if m.kind != "gpt":
        raise ValueError(f"model.kind = {m.kind!r}: only gpt converts to Hugging Face")
    model_type = "llama" if m.attention_window is None else "mistral"
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": m.d_model, "intermediate_size": ffn_hidden_size(m), "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": attention_head_dim(m),
        "num_hidden_layers": m.n_layers, "vocab_size": m.vocab_size, "rms_norm_eps": float(m.norm_eps),
        **_rope_to_hf(m), "tie_word_embeddings": bool(m.tie_embeddings), "initializer_range": float(m.init_std),
        "attention_dropout": 0.0, "dtype": str(dtype).replace("torch.", ""),
        "max_position_embeddings": int(seq_len), "bos_token_id": None, "eos_token_id": eos_token_id,
        "pad_token_id": None,
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config["sliding_window"] = m.attention_window + 1  # HF counts the query's own key
    config.update({k: v for k, v in (kept or {}).items() if k in KEPT})
    return config


def fresh_output(out: Path) -> None:
    """A conversion writes into a new (or empty) directory only: writing a step_0 into a checkpoint directory
    would prune its trained checkpoints (keep_last), and other outputs would be overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty directory; choose a new output path")


@dataclasses.dataclass(frozen=True)
class HFExport:
    """What :func:`to_hf` wrote: the HF ``directory``, and the fingerprint of the ``tokenizer`` whose tokens the
    exported model's ids mean (the checkpoint's; None: not recorded), as its safetensors metadata names it."""
    directory: Path
    tokenizer: Optional[str]


def to_hf(ckpt: PathLike, out: PathLike) -> HFExport:
    """Write ``out/model.safetensors`` + ``out/config.json`` (+ the model's tokenizer.json, see the module doc) from a
    (verified) dist-train checkpoint. ``out`` may already hold other files (the model's tokenizer), never those two."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; --to hf writes a directory (model.safetensors, config.json)")
    taken = [n for n in ("model.safetensors", "config.json") if (out / n).exists()]
    if taken:
        raise ValueError(f"{out}: already holds {' and '.join(taken)}; choose a new output directory")
    tensors, body = load_model_tensors(ckpt)
    cfg = body.get("config") or {}
    m = saved_model_config(body, f"checkpoint {ckpt}")
    if m.kind != "gpt":
        raise ValueError(f"checkpoint {ckpt} holds a '{m.kind}' model; only gpt converts to HF "
                         "(use --to dcp or --to torch)")
    check_tensors(tensors, m, f"checkpoint {ckpt}")
    data = cfg.get("data") or {}
    eos = 256 if data.get("tokenizer", "byte") == "byte" and m.vocab_size == 257 else None
    kept = dict(cfg.get("hf_config") or {})
    if "max_position_embeddings" in kept and data.get("seq_len"):  # a fine-tune of an import: it was trained at
        kept["max_position_embeddings"] = max(kept["max_position_embeddings"], data["seq_len"])  # seq_len at least
    config = hf_config(m, tensors["tok_embeddings.weight"].dtype, kept, data.get("seq_len", 2048), eos)
    tokenizer = trained_tokenizer(checkpoint_extra(ckpt))
    source = tokenizer_source(tokenizer, out, data.get("path"), ckpt)
    companions = tokenizer_companions(source, out) if source is not None else []
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "source": f"dist-train {Path(ckpt).name}"}
    if tokenizer:  # which tokens the ids mean (the fingerprint of data/tokenizer.py)
        metadata["tokenizer"] = tokenizer
    save_file({to_hf_name(k): v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata=metadata)
    if source is not None:
        shutil.copyfile(source, out / TOKENIZER_FILE)
    for companion in companions:
        shutil.copyfile(companion, out / companion.name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return HFExport(out, tokenizer)


def missing_tokenizer_note(export: HFExport) -> Optional[str]:
    """One line when the ``export``'s directory lacks the tokenizer.json its model's ids mean (a tokenizer.json
    fingerprint recorded, but the file the training data's sidecar named was moved or changed, so :func:`to_hf` copied
    nothing): the exported model would otherwise be handed on without a word about which tokens its ids mean."""
    tokenizer, out = export.tokenizer, export.directory
    if not tokenizer or tokenizer == BYTE_FINGERPRINT or (Path(out) / TOKENIZER_FILE).is_file():
        return None
    if tokenizer.startswith("spm-sha256:"):  # an import of a sentencepiece-only directory: no file is recorded
        return (f"note: {out} has no {TOKENIZER_FILE}: the model's ids mean the pieces of the sentencepiece tokenizer "
                f"{tokenizer} (named in model.safetensors' metadata), the {SENTENCEPIECE_FILE} of the HF directory it "
                f"was imported from; copy that file (with its tokenizer_config.json) into {out}")
    return (f"note: {out} has no {TOKENIZER_FILE}: the model's ids mean the tokens of tokenizer {tokenizer} (named in "
            f"model.safetensors' metadata), and the file its training data was prepared with is no longer where the "
            f"data's sidecar says or has changed; copy that tokenizer.json into {out}")


def tokenizer_source(tokenizer: Optional[str], out: Path, data_path: Optional[str], ckpt: PathLike) -> Optional[Path]:
    """The tokenizer.json an export of a model of tokenizer fingerprint ``tokenizer`` copies into ``out``: the one
    the sidecar of the training data ``data_path`` names, when it is still there with that fingerprint; None when
    there is nothing to copy (unknown or byte tokenizer, file gone or changed, or ``out`` already holds it).
    ValueError (one line) when ``out`` holds a tokenizer.json of another fingerprint: the export would pair the
    weights with tokens they were not trained on."""
    present = out / TOKENIZER_FILE
    if tokenizer and present.is_file():
        found = tokenizer_fingerprint(present)
        if fingerprints_differ(found, tokenizer):
            raise ValueError(f"{present}: tokenizer {found}, but checkpoint {ckpt} holds a model of tokenizer "
                             f"{tokenizer}: its ids would be read as other tokens; export into another directory, or "
                             "put the model's tokenizer.json there")
        return None
    if not tokenizer or tokenizer == BYTE_FINGERPRINT or not data_path:
        return None
    try:
        named = (read_sidecar(data_path) or {}).get("tokenizer")
        if named and Path(named).is_file() and tokenizer_fingerprint(named) == tokenizer:
            return Path(named)
    except ValueError:  # an unreadable sidecar or tokenizer: nothing to copy, the metadata still names it
        return None
    return None


def tokenizer_companions(source: Path, out: Path) -> list[Path]:
    """The ``TOKENIZER_COMPANIONS`` beside the tokenizer.json ``source`` that an export into ``out`` copies with it
    (those ``out`` holds with the same bytes are left as they are). ValueError (one line) when ``out`` holds one with
    other bytes: it would give the exported tokenizer another tokenizer's special tokens, and it is not ours to
    replace."""
    copied = []
    for name in TOKENIZER_COMPANIONS:
        theirs, ours = Path(source).parent / name, out / name
        if not theirs.is_file():
            continue
        if not ours.exists():
            copied.append(theirs)
        elif not ours.is_file() or ours.read_bytes() != theirs.read_bytes():
            raise ValueError(f"{ours}: differs from {theirs}, which goes with the model's tokenizer.json (its special "
                             "tokens); export into another directory, or remove it")
    return copied


# -- HF -> dist-train --------------------------------------------------------------------------
def _rope_kind(params: dict) -> dict:
    """A RoPE mapping without its theta, with ``type`` (transformers < 4.45) spelled ``rope_type``."""
    out = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    out.setdefault("rope_type", params.get("type", "default"))
    return out


def _rope_from_hf(hf: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, model.rope_scaling) from either layout; ValueError for scalings dist-train lacks."""
    params, theta, legacy = hf.get("rope_parameters"), hf.get("rope_theta"), hf.get("rope_scaling")
    field = "rope_parameters"
    if params is None:
        field, params = "rope_scaling", dict(legacy or {})
        if theta is not None:
            params["rope_theta"] = theta
    elif not isinstance(params, dict):
        raise ValueError(f"config.json rope_parameters = {params!r}: expected a mapping")
    else:
        if theta is not None and float(theta) != float(params.get("rope_theta", theta)):
            raise ValueError(f"config.json rope_theta = {theta} disagrees with rope_parameters.rope_theta = "
                             f"{params.get('rope_theta')}")
        if legacy and _rope_kind(legacy) != _rope_kind(params):  # older readers' copy: must say the same
            raise ValueError(f"config.json rope_scaling = {legacy} disagrees with rope_parameters = {params}")
        params = {**params, "rope_theta": params.get("rope_theta", theta)}
    params = {k: v for k, v in params.items() if v is not None}
    rope_type = params.pop("rope_type", params.pop("type", "default"))  # the inner pop always runs: "type" goes
    theta = float(params.pop("rope_theta", 10000.0))
    if rope_type == "default":
        if params:
            raise ValueError(f"config.json {field} has {', '.join(sorted(params))} with rope_type default: "
                             "dist-train's RoPE has no such setting")
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"config.json {field}.rope_type = {rope_type!r}: only default and llama3 RoPE convert "
                         "(dist-train does not implement this scaling; converting would change the model)")
    scaling = {"rope_type": "llama3", **params}
    try:
        validate_rope_scaling(scaling)
    except ConfigError as e:
        raise ValueError(f"config.json {field}: {e}") from None
    return theta, {k: scaling[k] for k in LLAMA3_ROPE_KEYS}


def check_window_fields(hf: dict, model_type: str) -> None:
    """ValueError (one line) for a window field the architecture's transformers model does not apply: the file
    would say one model and transformers compute another (LlamaForCausalLM attends to every earlier key whatever
    ``sliding_window`` says; MistralForCausalLM applies ``sliding_window`` whatever ``use_sliding_window`` says).
    ``hf``: config.json with its omitted fields read as transformers reads them (:data:`HF_DEFAULTS`)."""
    window = hf["sliding_window"]
    if model_type == "llama" and window is not None:
        raise ValueError(f"config.json sliding_window = {window!r} with model_type llama: LlamaForCausalLM does not "
                         "apply it (transformers attends to every earlier key), so the file names two models; remove "
                         "it, or set model_type mistral (MistralForCausalLM) for a windowed model")
    if model_type == "mistral" and hf.get("use_sliding_window") is False and window is not None:
        raise ValueError(f"config.json use_sliding_window = false: MistralForCausalLM does not read use_sliding_window "
                         f"(transformers applies sliding_window = {window}); remove it, or set sliding_window null for "
                         "full causal attention")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The dist-train ModelConfig of an HF Llama/Mistral config.json; ValueError (one line) for any field
    that would otherwise be dropped or change the model."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config.json model_type = {model_type!r}: only {', '.join(ARCHITECTURES)} convert "
                         "(other architectures differ in biases, norms or attention)")
    arch = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if list(arch) != [ARCHITECTURES[model_type]]:
        raise ValueError(f"config.json architectures = {arch}: expected [{ARCHITECTURES[model_type]}]")
    unknown = sorted(set(hf) - set(MAPPED) - set(REQUIRED) - set(KEPT) - set(IGNORED))
    if unknown:
        raise ValueError(f"config.json field {unknown[0]!r} = {hf[unknown[0]]!r} is not one this converter knows "
                         "(it could change the model); nothing was written")
    for key, values in REQUIRED.items():
        if key in hf and hf[key] not in values:
            raise ValueError(f"config.json {key} = {hf[key]!r}: dist-train's GPT only computes {key} = "
                             f"{' or '.join(map(repr, values))}")
    hf = {**HF_DEFAULTS[model_type], **hf}
    check_window_fields(hf, model_type)
    theta, scaling = _rope_from_hf(hf)
    window = hf["sliding_window"]
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"config.json sliding_window = {window!r}: expected null or a positive number of keys")
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf["head_dim"] or d // heads
    m = ModelConfig(kind="gpt", d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
                    n_kv_heads=hf["num_key_value_heads"] or heads, ffn_hidden=hf["intermediate_size"],
                    vocab_size=hf["vocab_size"], rope_theta=theta, rope_scaling=scaling,
                    norm_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf["tie_word_embeddings"]),
                    init_std=float(hf["initializer_range"]),
                    attention_window=None if window is None else window - 1,
                    head_dim=None if head_dim * heads == d else head_dim)
    if heads % m.n_kv_heads or head_dim % 2:
        raise ValueError(f"config.json: num_attention_heads = {heads}, num_key_value_heads = {m.n_kv_heads}, "
                         f"head_dim = {head_dim}: need heads divisible by KV heads and an even head_dim")
    return m


SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def weight_files(hf_dir: Path) -> list[Path]:
    """The ``*.safetensors`` of ``hf_dir`` that transformers reads: ``model.safetensors`` when it exists, else the
    shards ``model.safetensors.index.json`` names; without either, every ``*.safetensors`` there. Other files
    beside them (a stale single file of an earlier save, a stray copy) are not the model's."""
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    if (hf_dir / INDEX_FILE).is_file():
        names = sorted(set(map(str, (json.loads((hf_dir / INDEX_FILE).read_text()).get("weight_map") or {}).values())))
        # a downloaded index must not make the import read weights from elsewhere on this machine (symlinks inside
        # the directory stay allowed: the hub cache's snapshot files link to its blobs)
        outside = [n for n in names if PurePosixPath(n).is_absolute() or ".." in PurePosixPath(n).parts]
        if outside:
            raise ValueError(f"{hf_dir / INDEX_FILE}: weight_map names {outside[0]!r}, a file outside {hf_dir} (an "
                             f"absolute path or '..'); expected the shards' names inside the directory")
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if not names or missing:
            raise ValueError(f"{hf_dir / INDEX_FILE}: names {', '.join(missing) or 'no shard'}"
                             f"{' (missing)' if missing else ''}; expected the shards of a complete save")
        return [hf_dir / n for n in names]
    return sorted(hf_dir.glob("*.safetensors"))


#: the RoPE inverse-frequency buffer older transformers versions saved with the weights (a cache of what
#: config.json's rope settings give; transformers ignores it on load)
ROTARY_CACHE = re.compile(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq")


def read_hf_dir(hf_dir: PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config.json, {dist-train name: tensor}, {HF name: rotary cache}) of an HF directory (its
    :func:`weight_files`); a tensor in two of them is refused (which one is the model's is not said)."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    files = weight_files(hf_dir) if cfg_path.is_file() else []
    if not files:
        raise ValueError(f"{hf_dir}: expected config.json and *.safetensors (an HF Llama/Mistral directory)")
    hf = json.loads(cfg_path.read_text())
    tensors: dict[str, torch.Tensor] = {}
    rotary: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            if name in source:
                raise ValueError(f"{hf_dir}: tensor {name} is in both {source[name]} and {f.name}: which one is the "
                                 "model's is not said; move the other file away")
            source[name] = f.name
            if ROTARY_CACHE.fullmatch(name):
                rotary[name] = t
            else:
                tensors[from_hf_name(name)] = t
    return hf, tensors, rotary


def check_rotary_caches(rotary: dict[str, torch.Tensor], m: ModelConfig, where: str) -> None:
    """Saved RoPE caches ``rotary`` ({HF name: inv_freq [head_dim / 2]}) must be what ``m``'s rope settings give
    (``models.gpt.rope_inv_freq``), as transformers recomputes them from config.json and ignores the file's: a
    cache that differs says the weights were trained with another RoPE than config.json describes."""
    want = rope_inv_freq(attention_head_dim(m), m.rope_theta, m.rope_scaling)
    for name, t in sorted(rotary.items()):
        # in the cache's own dtype (a model saved in fp16 saved its buffers in fp16), to a few of its ulps
        if (t.shape != want.shape or not t.is_floating_point()
                or not torch.allclose(t.float(), want.to(t.dtype).float(), rtol=4 * torch.finfo(t.dtype).eps, atol=0.0)):
            raise ValueError(f"{where}: {name} (a saved RoPE cache) differs from the inverse frequencies config.json's "
                             f"rope settings give (rope_theta {m.rope_theta}, scaling {m.rope_scaling}): the weights were "
                             "trained with another RoPE; fix config.json's rope fields, or drop the cache to use them")


def from_hf(hf_dir: PathLike, out: PathLike) -> Path:
    """Write a dist-train checkpoint ``out/step_0`` (weights only, step 0) from an HF Llama/Mistral
    directory. Start pretraining from it with ``--set checkpoint.resume=OUT`` and the ``model:`` section
    this prints (:func:`model_config_from_hf`)."""
    fresh_output(Path(out))
    hf, tensors, rotary = read_hf_dir(hf_dir)
    m = model_config_from_hf(hf)
    check_rotary_caches(rotary, m, f"{hf_dir}")
    if m.tie_embeddings and "output.weight" in tensors:  # tied: the head is the embedding, stored twice or not
        head, embedding = tensors.pop("output.weight"), tensors.get("tok_embeddings.weight")
        if embedding is not None and (head.shape != embedding.shape or not torch.equal(head, embedding)):
            raise ValueError(f"{hf_dir}: config.json tie_word_embeddings = true, but lm_head.weight differs from "
                             "model.embed_tokens.weight: transformers 5 then keeps both (untied), older versions tie "
                             "them, so the file names two models; set tie_word_embeddings false to keep the head, or "
                             "drop lm_head.weight to tie")
    check_tensors(tensors, m, f"{hf_dir}")
    kept = {k: hf[k] for k in KEPT if k in hf}
    tokenizer = hf_dir_fingerprint(hf_dir)  # the ids' meaning: a fine-tune on data of another one is refused
    extra = {"train_tokenizer": tokenizer} if tokenizer else {}
    return write_step0(out, tensors, {"model": dataclasses.asdict(m), "source": str(hf_dir), "hf_config": kept}, extra)


def write_step0(out: PathLike, tensors: dict[str, torch.Tensor], config: dict, extra: Optional[dict] = None) -> Path:
    """A weights-only, single-process step-0 checkpoint of the model ``tensors`` ({fqn: full tensor}) under
    ``out``, with ``config`` in its manifest and ``extra`` in its train state (what a converted model is trained or
    resumed from)."""
    ckpt_cfg = CheckpointConfig(every=0, keep_last=1, async_save=False, resume="none", dir=str(out), on_error="stop")
    CheckpointManager(ckpt_cfg, run_dir=Path(out), config=config, layout={"world_size": 1}).save_tensors(0, tensors,
                                                                                                         extra)
    return Path(out) / mf.step_dir_name(0)
