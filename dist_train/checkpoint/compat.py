"""Does a checkpoint belong to the model being resumed? Config and tensor-table checks, one line each.

    check_config(ckpt, saved_config, config, allowed=["model.attention_window"])   # raises ResumeMismatchError
    check_tensors(ckpt, saved_table, model_keys, shapes)                          # raises ResumeMismatchError

Resuming into a model that differs from the saved one must never "work": a smaller ``n_layers`` silently
drops saved layers, a different ``rope_theta`` or ``norm_eps`` loads every weight into a different function.
So the saved ``model`` section (and the tokenizer, which gives the token ids their meaning, and the keys that
fix which sample ``consumed_samples`` points at: run.seed, data.source/path/seq_len/split) must equal the
current one, key by key (the keys the model reads: ``unread_keys``), unless the user lists the key in
``checkpoint.allow_config_change``; and the
model's tensors must be exactly the saved ``model.*`` tensors, with equal shapes, in both directions.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from dist_train.checkpoint.storage import CheckpointError
from dist_train.config import (RESUME_CHECKED_KEYS, RESUME_DATA_ORDER_KEYS, ModelConfig, attention_head_dim,
                               ffn_hidden_size, resume_unread_keys, swin_ffn_hidden_size)
from dist_train.data.fingerprint import digest_kind
from dist_train.data.tokenizer import fingerprints_differ

#: Config keys a checkpoint must agree on: every key of these sections, and these single keys.
CHECKED_SECTIONS = ("model",)
CHECKED_KEYS = RESUME_CHECKED_KEYS
#: Keys that may differ without being allowed: they only matter before the first step.
FREE_KEYS = frozenset({"model.init_std"})
_SHOWN = 3  # names listed per kind of tensor mismatch (then "and N more")
_MISSING = object()  # a key the config does not have


class ResumeMismatchError(CheckpointError):
    """The checkpoint was saved from a different model (config or tensors); bad input, so exit status 2."""

    exit_code = 2


def checked_keys(config: Mapping[str, Any]) -> list[str]:
    """The dotted keys of ``config`` that a resume compares (see ``CHECKED_SECTIONS``/``CHECKED_KEYS``)."""
    keys = [f"{s}.{k}" for s in CHECKED_SECTIONS for k in (config.get(s) or {}) if f"{s}.{k}" not in FREE_KEYS]
    return keys + [k for k in CHECKED_KEYS if _lookup(config, k) is not _MISSING]


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))


def _sizes_as_built(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` with the model sizes whose null means "derived" (``n_kv_heads``, ``ffn_hidden``, gpt
    ``head_dim``) replaced by the value the model is built with, so that an explicit ``ffn_hidden: 704`` (what
    an HF import writes) equals an omitted one on a d=256 GPT. Only keys the section records are filled."""
    model = config.get("model")
    if not isinstance(model, Mapping):
        return config
    try:
        m = ModelConfig(**{k: v for k, v in model.items() if k in _MODEL_FIELDS})
        built = {"n_kv_heads": m.n_kv_heads or m.n_heads,
                 "ffn_hidden": ffn_hidden_size(m) if m.kind == "gpt" else swin_ffn_hidden_size(m)}
        if m.kind == "gpt":
            built["head_dim"] = attention_head_dim(m)
    except (TypeError, ZeroDivisionError):  # a section too broken to build: compare it as written
        return config
    resolved = {k: (built[k] if v is None and k in built else v) for k, v in model.items()}
    return {**config, "model": resolved}


def unread_keys(config: Mapping[str, Any]) -> frozenset:
    """Checked keys ``config``'s model never reads (``config.resume_unread_keys``). Validation refuses them set; a
    checkpoint that recorded one set (accepted and unread by an older version) must not block a resume over a value
    nothing reads."""
    return resume_unread_keys((config.get("model") or {}).get("kind", "gpt"))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       consumed_samples: Optional[int] = None, saved_digest: Optional[str] = None,
                       current_digest: Optional[str] = None, saved_tokenizer: Optional[str] = None,
                       current_tokenizer: Optional[str] = None) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, saved value, current value)]`` for every checked key present on both sides whose
    values differ, null sizes compared as the model builds them (``_sizes_as_built``). A key the checkpoint does
    not record (saved by an older version, or a converted checkpoint that knows no such field) is not compared:
    its default is, by design, the older behaviour. ``consumed_samples == 0`` (an imported step 0): no data
    order to keep, so the data-order keys are not compared. ``saved_digest``: the checkpoint's ``train_digest``;
    ``current_digest``: the token digest of the dataset at the current data.path (its sidecar's, read once by the
    caller). When both are known and equal, data.path is no change: the same text the run trained on, whatever
    path it was named by then (moved, copied to local disk, or named relative instead of absolute).
    ``saved_tokenizer``: the checkpoint's ``train_tokenizer``; ``current_tokenizer``: the fingerprint the dataset's
    sidecar records. When both are known (and comparable: ``fingerprints_differ``), they decide and data.tokenizer's
    text is not compared: equal, the same
    tokenizer, whatever path (or leftover ``byte``, which only builds missing data) names it; different,
    :func:`check_tokenizer` refuses naming both (allowed by the same key, data.tokenizer)."""
    skip = (set(RESUME_DATA_ORDER_KEYS) if consumed_samples == 0 else set()) | unread_keys(current)
    if saved_digest and saved_digest == current_digest:
        skip.add("data.path")
    if saved_tokenizer and current_tokenizer and (saved_tokenizer == current_tokenizer
                                                  or fingerprints_differ(saved_tokenizer, current_tokenizer)):
        skip.add("data.tokenizer")
    saved, current = _sizes_as_built(saved), _sizes_as_built(current)
    out = []
    for key in (k for k in checked_keys(current) if k not in skip):
        old, new = _lookup(saved, key), _lookup(current, key)
        if old is _MISSING or new is _MISSING:
            continue
        if old != new:
            out.append((key, old, new))
    return out


def check_config(ckpt: Path, saved: Optional[Mapping[str, Any]], current: Mapping[str, Any],
                 allowed: Iterable[str] = (), consumed_samples: Optional[int] = None,
                 saved_digest: Optional[str] = None, current_digest: Optional[str] = None,
                 saved_tokenizer: Optional[str] = None,
                 current_tokenizer: Optional[str] = None) -> list[tuple[str, Any, Any]]:
    """Raise ``ResumeMismatchError`` listing every difference not in ``allowed``; return the allowed ones.
    ``consumed_samples``, ``saved_digest``, ``saved_tokenizer``: the checkpoint's; ``current_digest``,
    ``current_tokenizer``: the current dataset's (see ``config_differences``)."""
    if not saved:
        return []
    allowed = set(allowed)
    diffs = config_differences(saved, current, consumed_samples, saved_digest, current_digest, saved_tokenizer,
                               current_tokenizer)
    refused = [d for d in diffs if d[0] not in allowed]
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in refused)
        keys = ", ".join(k for k, _, _ in refused)
        raise ResumeMismatchError(f"checkpoint {ckpt} was saved with a different model/data config: {listed}; resume "
                                  f"refused (if this change is intended, set checkpoint.allow_config_change: "
                                  f"[{keys}])")
    return [d for d in diffs if d[0] in allowed]


#: Sections whose remaining differences a resume applies as configured now, and names in one log line.
REPORTED_SECTIONS = ("data", "train", "parallel")


def applied_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                        reported: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, saved value, current value)]`` for every key of ``REPORTED_SECTIONS`` that both configs
    record and that differs, except the keys in ``reported`` (already named, or refused, elsewhere): what the
    resumed run does differently without a refusal (e.g. data.document_mask, train.grad_clip, parallel.dp), so
    that no such change goes unsaid. Values are compared as the checkpoint stores them (JSON: tuples are lists)."""
    saved, current = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(current, default=str))
    skip = set(reported) | set(checked_keys(current))
    out = []
    for section in REPORTED_SECTIONS:
        old_s, new_s = saved.get(section), current.get(section)
        if not isinstance(old_s, Mapping) or not isinstance(new_s, Mapping):
            continue
        for key in (k for k in new_s if k in old_s and f"{section}.{k}" not in skip):
            if old_s[key] != new_s[key]:
                out.append((f"{section}.{key}", old_s[key], new_s[key]))
    return out


#: Data keys whose (allowed) change alters the number of training samples by itself: the data-order keys but
#: run.seed, which reorders the same samples.
SAMPLE_COUNT_KEYS = frozenset(RESUME_DATA_ORDER_KEYS) - {"run.seed"}


def check_dataset(ckpt: Path, extra: Mapping[str, Any], samples: Optional[int], allowed: Iterable[str],
                  path: Optional[str], changes: Iterable[tuple[str, Any, Any]] = (),
                  digest: Optional[str] = None) -> None:
    """Refuse a resume whose training dataset differs from the checkpoint's run's at the same data.path
    (re-prepared or replaced): consumed_samples would point into another permutation or other text. It
    differs when it has ``samples`` samples where the checkpoint's run had ``extra["train_samples"]``, or when
    its token stream's ``digest`` (``dist-train data prepare``'s sidecar, else the sampled fingerprint of
    data/fingerprint.py) is not ``extra["train_digest"]``; each is compared only when both sides have it
    (digests only of one kind: a full digest is never compared with a fingerprint). Only once samples were
    consumed; allowed with ``allow_config_change: [data.path]``, and not compared after an allowed change
    (``changes``, from ``check_config``) of a key in SAMPLE_COUNT_KEYS."""
    consumed = extra.get("consumed_samples")
    if not consumed or "data.path" in set(allowed) or SAMPLE_COUNT_KEYS & {key for key, _, _ in changes}:
        return
    saved, saved_digest = extra.get("train_samples"), extra.get("train_digest")
    if saved is not None and samples is not None and saved != samples:
        found = f"was trained on {saved} samples of data.path {path}, it now has {samples}"
    elif saved_digest and digest and digest_kind(saved_digest) == digest_kind(digest) and saved_digest != digest:
        found = f"was trained on data.path {path} with token digest {saved_digest}, it now holds {digest}"
    else:
        return
    raise ResumeMismatchError(f"checkpoint {ckpt} {found}: the dataset was re-prepared or replaced, so "
                              f"consumed_samples = {consumed} points into another order; resume refused (if this "
                              "change is intended, set checkpoint.allow_config_change: [data.path])")


def check_tokenizer(ckpt: Path, extra: Mapping[str, Any], tokenizer: Optional[str], allowed: Iterable[str],
                    path: Optional[str]) -> None:
    """Refuse a resume or fine-tune whose training data at ``path`` was prepared with a tokenizer (fingerprint
    ``tokenizer``, its sidecar's) other than the one the checkpoint's model learnt its ids from
    (``extra["train_tokenizer"]``: its training data's, or the tokenizer.json beside an HF import): every id would
    mean another token to the model. Unlike :func:`check_dataset` this holds after an allowed data.path change and
    at step 0 (a new corpus is fine, other token meanings are not). Compared only when both sides are known (older
    checkpoints and sidecars record none); allowed with ``allow_config_change: [data.tokenizer]``."""
    saved = extra.get("train_tokenizer")
    if not fingerprints_differ(saved, tokenizer) or "data.tokenizer" in set(allowed):
        return
    raise ResumeMismatchError(f"checkpoint {ckpt} holds a model of tokenizer {saved}, but data.path {path} was "
                              f"prepared with tokenizer {tokenizer}: its token ids would mean other tokens to the "
                              "model; resume refused (prepare the data with the model's tokenizer.json, or if this change is "
                              "intended, set checkpoint.allow_config_change: [data.tokenizer])")


def shortened_list(keys: Sequence[str]) -> str:
    """The first few of ``keys``, comma-separated, then "and N more": a refusal stays one readable line."""
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def check_tensors(ckpt: Path, saved: Mapping[str, dict], model_keys: Iterable[str],
                  shapes: Mapping[str, Sequence[int]]) -> None:
    """``saved``: the manifest's tensor table; ``model_keys``: every ``model.*`` tensor key of the loading
    model (all ranks together); ``shapes``: this rank's tensors and their global shapes. Raises one line
    naming the missing, unexpected and mis-shaped tensors."""
    model_keys = set(model_keys)
    saved_model = {k for k in saved if k.startswith("model.")}
    missing = sorted(model_keys - saved_model)
    unexpected = sorted(saved_model - model_keys)
    wrong = sorted(k for k, shape in shapes.items() if k in saved and list(shape) != saved[k]["shape"])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model not in the checkpoint ({shortened_list(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} saved tensor(s) the model does not have ({shortened_list(unexpected)})")
    if wrong:
        shown = [f"{k} saved {saved[k]['shape']}, model {list(shapes[k])}" for k in wrong[:_SHOWN]]
        parts.append(f"{len(wrong)} shape mismatch(es) ({'; '.join(shown)}"
                     + (f" and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else "") + ")")
    raise ResumeMismatchError(f"checkpoint {ckpt} does not match the model: {'; '.join(parts)}; resume refused "
                              "(was it saved from a different model config?)")
