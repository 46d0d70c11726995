"""Tokenizers: a byte-level one that needs no download, or a HuggingFace ``tokenizer.json``."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document = 256 (vocab 257)."""
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` file read with the `tokenizers` package (optional extra ``.[hf]``)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:  # optional dependency
            raise ValueError(f"--tokenizer {path}: needs the 'tokenizers' package (pip install 'dist-train[hf]')") from e
        self._tok = _Tok.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        eod = None
        for name in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"):
            eod = self._tok.token_to_id(name)
            if eod is not None:
                break
        self.eod_id = eod if eod is not None else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids


def get_tokenizer(spec: str) -> "ByteTokenizer | HFTokenizer":
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise ValueError(f"tokenizer '{spec}': not 'byte' and no such tokenizer.json file")
    return HFTokenizer(spec)
