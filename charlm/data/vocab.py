"""The vocabulary: a corpus's units, sorted, mapped to ids 0..size-1.

The unit is the Unicode code point by default (``data.unit = "char"``), or the UTF-8 byte
(``"byte"``, how enwik8 results are reported): a byte vocabulary stores each byte b as the
character chr(b), so both kinds share one lookup table and one checkpoint format.
"""

from __future__ import annotations

import codecs
from typing import Callable

import numpy as np

from ..errors import CharlmError

MAX_CODE_POINT = 0x110000


class Vocab:
    """Maps characters (code points) to ids 0..size-1 and back."""

    unit = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("a vocabulary needs distinct characters")
        self.chars = chars
        points = np.array([ord(c) for c in chars], dtype=np.int64)
        self._lookup = np.full(MAX_CODE_POINT, -1, dtype=np.int32)
        self._lookup[points] = np.arange(len(chars), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: str) -> bool:
        return bool((self.ids_of(self.units(char)) >= 0).all())

    def units(self, text: str) -> np.ndarray:
        """The units ``text`` is made of, as numbers: code points, or bytes in a ``ByteVocab``."""
        return units_of(text, self.unit)

    def ids_of(self, points: np.ndarray) -> np.ndarray:
        """The id of each code point in ``points``, -1 where the vocabulary lacks it."""
        return self._lookup[points]

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` missing from the vocabulary, in order of appearance."""
        points = code_points(text)
        return list(dict.fromkeys(map(chr, points[self.ids_of(points) < 0].tolist())))

    def encode(self, text: str, skip_unknown: bool = False) -> np.ndarray:
        ids = self.ids_of(self.units(text))
        if (ids < 0).any():
            if not skip_unknown:
                raise KeyError(self.unknown(text))
            ids = ids[ids >= 0]
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def stream_decoder(self) -> Callable[[list[int], bool], str]:
        """``decode`` for a text that arrives in pieces: ``(ids, final) -> text``."""
        return lambda ids, final=False: self.decode(ids)


class ByteVocab(Vocab):
    """Maps UTF-8 bytes to ids and back; decoding puts U+FFFD where the bytes are not UTF-8."""

    unit = "byte"

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` with a byte the vocabulary lacks."""
        return [char for char in dict.fromkeys(text) if char not in self]

    def decode(self, ids) -> str:
        return self.stream_decoder()(ids, True)

    def stream_decoder(self) -> Callable[[list[int], bool], str]:
        """A character split across two pieces is joined, not replaced (an incremental decoder)."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return lambda ids, final=False: decoder.decode(bytes(ord(self.chars[i]) for i in ids), final)


def make_vocab(chars: str, unit: str = "char") -> Vocab:
    """The vocabulary of ``unit`` (``data.unit``) whose units, in id order, are ``chars``."""
    return ByteVocab(chars) if unit == "byte" else Vocab(chars)


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def units_of(text: str, unit: str) -> np.ndarray:
    """``text`` as code points (``unit`` 'char') or as its UTF-8 bytes ('byte')."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8) if unit == "byte" else code_points(text)


def describe_chars(chars: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def unknown_characters(source: str, chars: list[str], remedy: str) -> CharlmError:
    """The one-line error for text with characters a model never saw, naming them."""
    return CharlmError(f"{source} has characters the model never saw: {describe_chars(chars)}; {remedy}")
