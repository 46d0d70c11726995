"""The dataset sidecar ``PREFIX.meta.json``: what built ``PREFIX.bin/.idx``, so training can check it.

    {"format": "dist-train-dataset/1", "tokenizer": "byte", "tokenizer_fingerprint": "byte", "vocab_size": 257,
     "eod_id": 256, "max_token_id": 255, "documents": 3, "tokens": 27, "digest": "xxh3_64:5f1b0c0a9d7e3c21"}

``tokenizer`` is the ``--tokenizer`` given (byte or a path); ``tokenizer_fingerprint`` names its definition
(:func:`dist_train.data.tokenizer.tokenizer_fingerprint`: ``byte``, or the digest of the tokenizer.json), so two
tokenizer files of equal vocabulary size and EOD id are told apart (sidecars written before it have none: the
tokenizer is then known only by kind, size and EOD id); ``vocab_size`` and ``eod_id`` are the tokenizer's;
``max_token_id`` is the largest id actually written (a model needs ``model.vocab_size > max_token_id``); ``digest``
is the XXH3-64 of the token stream (the ``.bin`` bytes; sidecars written before it have none). Datasets built elsewhere (Megatron-LM) have no
sidecar: :func:`read_sidecar` then returns None.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from ..atomic_write import write_text_atomic
from .tokenizer import BYTE_FINGERPRINT, fingerprints_differ, tokenizer_fingerprint

FORMAT = "dist-train-dataset/1"
SUFFIX = ".meta.json"
REQUIRED = ("tokenizer", "vocab_size", "eod_id", "max_token_id")
DIGEST_ALGORITHM = "xxh3_64"


def sidecar_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}{SUFFIX}")


def write_sidecar(prefix: Union[str, Path], info: dict) -> Path:
    """Write ``info`` (must hold REQUIRED) as PREFIX.meta.json, atomically (tmp file + rename)."""
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise ValueError(f"dataset sidecar for {prefix}: missing {', '.join(missing)}")
    path = sidecar_path(prefix)
    write_text_atomic(path, json.dumps({"format": FORMAT, **info}, indent=1) + "\n")
    return path


def read_sidecar(prefix: Union[str, Path]) -> Optional[dict]:
    """PREFIX.meta.json as a dict; None when there is none; ValueError (one line) when it is unreadable."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"dataset sidecar {path} cannot be read ({e}); rebuild it with dist-train data prepare") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or any(k not in body for k in REQUIRED):
        raise ValueError(f"dataset sidecar {path} is not a {FORMAT} file with {', '.join(REQUIRED)}; rebuild the "
                         "dataset with dist-train data prepare")
    return body


def sidecar_digest(body: Optional[dict]) -> Optional[str]:
    """The token stream's digest recorded by ``dist-train data prepare`` (``"xxh3_64:<hex>"``) in the sidecar
    ``body`` (:func:`read_sidecar`'s); None for a dataset without one (built elsewhere, or before digests were
    recorded)."""
    return body.get("digest") if body else None


def dataset_tokenizer(prefix: Union[str, Path]) -> Optional[str]:
    """:func:`sidecar_tokenizer` of the dataset at ``prefix``."""
    return sidecar_tokenizer(read_sidecar(prefix))


def sidecar_tokenizer(body: Optional[dict]) -> Optional[str]:
    """The fingerprint of the tokenizer a dataset was prepared with, from its sidecar ``body`` (:func:`read_sidecar`'s)
    (``"byte"`` or ``"vocab-sha256:<hex>"``); None when unknown (no sidecar, or a tokenizer.json's written before
    fingerprints were recorded). A sidecar of that age naming the byte tokenizer is ``"byte"``: there is only one (the
    demo's data_cache prepared then is compared with a model of a tokenizer.json)."""
    value = body.get("tokenizer_fingerprint") if body else None
    if value is None and body and body.get("tokenizer") == "byte":
        return BYTE_FINGERPRINT
    return value if isinstance(value, str) and value else None


def other_tokenizer_message(prefix: Union[str, Path], other: Union[str, Path], what: str, other_what: str,
                            sidecars: tuple[Optional[dict], Optional[dict]]) -> Optional[str]:
    """One line when the datasets ``prefix`` (config key ``what``) and ``other`` (``other_what``) were prepared with
    different tokenizers — the same id would mean another token in each — as far as their ``sidecars`` say (the two
    as :func:`read_sidecar` returns them, in that order: the tokenizer's kind, vocabulary size and EOD id, and its
    fingerprint when both record one); None when they agree or either has no sidecar (built elsewhere)."""
    a, b = sidecars
    if a is None or b is None:
        return None

    def identity(meta: dict) -> tuple:
        return meta["tokenizer"] == "byte", int(meta["vocab_size"]), int(meta["eod_id"])

    prints = a.get("tokenizer_fingerprint"), b.get("tokenizer_fingerprint")
    differ = fingerprints_differ(*prints)
    if identity(a) == identity(b) and not differ:
        return None

    def described(meta: dict) -> str:
        known = f", fingerprint {meta['tokenizer_fingerprint']}" if differ else ""
        return f"tokenizer {meta['tokenizer']} (vocabulary {meta['vocab_size']}, EOD id {meta['eod_id']}{known})"

    return (f"{other_what} = {other} was prepared with {described(b)} but {what} = {prefix} with {described(a)}: "
            f"its token ids would mean other tokens; prepare both with the same --tokenizer")


def named_tokenizer_message(prefix: Union[str, Path], tokenizer: str, body: Optional[dict]) -> Optional[str]:
    """One line when ``data.tokenizer`` (a tokenizer.json's path) names another tokenizer than the one the dataset at
    ``prefix`` was prepared with, by fingerprint (:func:`fingerprints_differ`), as its sidecar ``body`` says
    (:func:`read_sidecar`'s, read once by the caller): the model, sized and configured for one, would be fed the ids of
    the other. None when they agree or cannot be compared: ``byte``, the default, which only builds missing data (a
    config that never named the tokenizer of its data.path says ``byte``); a dataset whose sidecar records no
    tokenizer (none: built elsewhere; a tokenizer.json's before fingerprints) — as a checkpoint's tokenizer is,
    compared only when both sides are known. ValueError when the tokenizer.json cannot be read."""
    if tokenizer == BYTE_FINGERPRINT:
        return None
    recorded, named = sidecar_tokenizer(body), tokenizer_fingerprint(tokenizer)
    if not fingerprints_differ(recorded, named):
        return None
    prepared_with = body["tokenizer"]
    return (f"data.tokenizer = {tokenizer} (tokenizer {named}) but data.path = {prefix} was prepared with "
            f"{prepared_with} (tokenizer {recorded}, its {sidecar_path(prefix).name}): every id would mean another "
            "token than the configured tokenizer's; name the tokenizer the data was prepared with, prepare the data "
            "with this one (dist-train data prepare --tokenizer), or if intended set "
            "checkpoint.allow_config_change: [data.tokenizer]")
