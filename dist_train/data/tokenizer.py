"""Tokenizers: a byte-level one that needs no download, or a HuggingFace ``tokenizer.json``.

The end-of-document (EOD) id separates documents in a prepared dataset. An HF tokenizer's EOD is the
``--eod-token`` given, else the ``eos_token`` of a ``tokenizer_config.json`` next to the file, else the
first of the usual names (``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``) in the vocabulary;
without any of them preparation refuses rather than reuse an ordinary token as the separator.

A tokenizer's fingerprint (:func:`tokenizer_fingerprint`) names which token each id means: ``"byte"`` for the byte
tokenizer, ``"vocab-sha256:<16 hex>"`` of a tokenizer.json's id -> token table otherwise (``"spm-sha256:"`` of a
sentencepiece tokenizer.model's id -> piece table, for an HF import that has no tokenizer.json). Two files of equal
vocabulary size and EOD id that map ids to other tokens get different fingerprints; the same tokenizer re-saved (key
order, indentation, another `tokenizers` version's format) keeps its own. The dataset sidecar and checkpoints record
it, so data of another tokenizer is told apart from the model's.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Protocol, Union

EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BYTE_FINGERPRINT = "byte"
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_FILE = "tokenizer.json"  # an HF directory's tokenizer (what data prepare reads)


def tokenizer_fingerprint(path: Union[str, Path]) -> str:
    """``"vocab-sha256:<16 hex>"`` of the tokenizer.json at ``path``: the SHA-256 of its id -> token table (the
    model's vocabulary and the added tokens, as canonical JSON), which is what a model's ids mean. Formatting, key
    order and the serialisation a `tokenizers` version writes (merges as "a b" strings or as pairs, fields newer
    versions add with their defaults) do not count, so a hub file and the same tokenizer re-saved by
    ``save_pretrained`` agree; which token an id names does. A file whose model has no vocabulary table:
    ``"sha256:<16 hex>"`` of the whole canonical JSON (the first version's fingerprint of every file). ValueError (one
    line) when the file is not JSON."""
    try:
        body = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {path}: cannot be read as JSON ({e})") from None
    table = _id_table(body)
    kind, named = ("vocab-sha256", table) if table is not None else ("sha256", body)
    canonical = json.dumps(named, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return f"{kind}:" + hashlib.sha256(canonical).hexdigest()[:16]


def sentencepiece_fingerprint(path: Union[str, Path]) -> Optional[str]:
    """``"spm-sha256:<16 hex>"`` of the sentencepiece model (``tokenizer.model``, a ``ModelProto``) at ``path``: the
    SHA-256 of its id -> piece table, as canonical JSON. Scores, piece types, trainer and normalizer settings do not
    count (they change how text is cut, not which piece an id names). Read from the protobuf wire format here: the
    ``sentencepiece`` package is not needed. None when the file is not a sentencepiece model (Llama 3's original
    tokenizer.model is tiktoken text); ValueError (one line) when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"tokenizer {path}: cannot be read ({e})") from None
    pieces = _sentencepiece_pieces(data)
    if not pieces:
        return None
    canonical = json.dumps({"pieces": list(enumerate(pieces))}, separators=(",", ":"), ensure_ascii=False)
    return "spm-sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def hf_dir_fingerprint(hf_dir: Union[str, Path]) -> Optional[str]:
    """The fingerprint of an HF model directory's tokenizer: its tokenizer.json's (what ``data prepare`` reads), else
    its sentencepiece tokenizer.model's; None when it has neither (or a tokenizer.model of another format)."""
    tokenizer, spm = Path(hf_dir) / TOKENIZER_FILE, Path(hf_dir) / SENTENCEPIECE_FILE
    if tokenizer.is_file():
        return tokenizer_fingerprint(tokenizer)
    return sentencepiece_fingerprint(spm) if spm.is_file() else None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, next offset) of the protobuf varint at ``data[at:]``; ValueError past the end or beyond 64 bits."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> list[tuple[int, object]]:
    """(field number, value) of one protobuf message: an int for varints, the bytes of the others. ValueError when
    ``data`` is not a well-formed message (an unknown wire type, a length past its end)."""
    out, at = [], 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field 0")
        if wire == 0:
            value, at = _varint(data, at)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, at = _varint(data, at)
            else:
                size = 8 if wire == 1 else 4
            if at + size > len(data):
                raise ValueError("truncated")
            value, at = data[at:at + size], at + size
        else:  # 3, 4: groups (not in sentencepiece's schema); 6, 7: undefined
            raise ValueError(f"wire type {wire}")
        out.append((number, value))
    return out


def _sentencepiece_pieces(data: bytes) -> list[str]:
    """The pieces of a ``ModelProto`` in id order (field 1, each a ``SentencePiece`` whose field 1 is the piece);
    empty when ``data`` is not one."""
    try:
        pieces = []
        for number, value in _fields(data):
            if number != 1:
                continue
            if not isinstance(value, bytes):
                return []
            text = [v for n, v in _fields(value) if n == 1]
            if len(text) != 1 or not isinstance(text[0], bytes):
                return []
            pieces.append(text[0].decode("utf-8"))
        return pieces
    except (ValueError, UnicodeDecodeError):
        return []


def _id_table(body: object) -> Optional[dict]:
    """``{"vocab": [[id, token], ...], "added": [[id, token], ...]}`` (sorted by id) of a tokenizer.json's body:
    a BPE/WordPiece/WordLevel ``model.vocab`` maps token -> id, a Unigram one lists [token, score] in id order.
    None when there is no such table."""
    model = body.get("model") if isinstance(body, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    try:
        if isinstance(vocab, dict):
            pairs = sorted((int(i), str(t)) for t, i in vocab.items())
        elif isinstance(vocab, list):
            pairs = [(i, str(entry[0])) for i, entry in enumerate(vocab)]
        else:
            return None
        added = sorted((int(t["id"]), str(t["content"])) for t in body.get("added_tokens") or [])
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    return {"vocab": pairs, "added": added}


def fingerprints_differ(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two recorded tokenizer fingerprints name different tokenizers, as far as they can tell: both known,
    and of one kind (``byte`` against a file's always is); a ``sha256:`` of the first version (whole file), a
    ``vocab-sha256:`` and an ``spm-sha256:`` (a sentencepiece model's pieces, which a tokenizer.json converted from it
    lists with other added tokens) are not compared with each other, as two digest kinds of a dataset are not."""
    if not a or not b or a == b:
        return False
    kinds = {x.split(":", 1)[0] for x in (a, b)}
    return len(kinds) == 1 or BYTE_FINGERPRINT in kinds


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int
    fingerprint: str  # tokenizer_fingerprint: which tokens the ids mean

    def encode(self, text: Union[str, bytes]) -> list[int]: ...  # bytes: a text file's raw contents


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document = 256 (vocab 257). Raw bytes (a text file's) are their own ids,
    exactly, valid UTF-8 or not."""
    vocab_size = 257
    eod_id = 256
    fingerprint = BYTE_FINGERPRINT

    def encode(self, text: Union[str, bytes]) -> list[int]:
        return list(text) if isinstance(text, bytes) else list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _config_eos(path: Path) -> Optional[str]:
    """The ``eos_token`` of the ``tokenizer_config.json`` beside ``path`` (a string or {"content": …})."""
    side = path.parent / "tokenizer_config.json"
    try:
        eos = json.loads(side.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


class HFTokenizer:
    """A ``tokenizer.json`` file read with the `tokenizers` package (``pip install 'dist-train[hf]'``).

    eod_token: the end-of-document token's text (``--eod-token``); None: found as described above.
    """

    def __init__(self, path: str, eod_token: Optional[str] = None):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # optional dependency
            raise ValueError(f"--tokenizer {path}: needs the 'tokenizers' package (pip install 'dist-train[hf]')") from e
        self._tok = _Tok.from_file(path)
        self.fingerprint = tokenizer_fingerprint(path)
        self.vocab_size = self._tok.get_vocab_size()
        if eod_token is not None:
            eod = self._tok.token_to_id(eod_token)
            if eod is None:
                raise ValueError(f"--eod-token {eod_token!r} is not a token of {path} (vocabulary of "
                                 f"{self.vocab_size}); give a token of that vocabulary, e.g. its EOS token")
        else:
            names = ([n] if (n := _config_eos(Path(path))) else []) + list(EOS_NAMES)
            eod = next((i for i in map(self._tok.token_to_id, names) if i is not None), None)
            if eod is None:
                raise ValueError(f"tokenizer {path} has no recognised end-of-document token (looked for "
                                 f"{', '.join(EOS_NAMES)}); name it with --eod-token TOKEN")
        self.eod_id = int(eod)

    def encode(self, text: Union[str, bytes]) -> list[int]:
        """Raw bytes are decoded as UTF-8 first (an invalid sequence becomes U+FFFD)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text).ids


def get_tokenizer(spec: str, eod_token: Optional[str] = None) -> "ByteTokenizer | HFTokenizer":
    if spec == "byte":
        if eod_token is not None:
            raise ValueError(f"--eod-token {eod_token!r}: the byte tokenizer's end-of-document is fixed (id 256); "
                             "--eod-token applies to a tokenizer.json")
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise ValueError(f"tokenizer '{spec}': not 'byte' and no such tokenizer.json file")
    return HFTokenizer(spec, eod_token)
