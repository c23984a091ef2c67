"""The vocabulary: a corpus's Unicode code points, sorted, mapped to ids 0..size-1."""

from __future__ import annotations

import numpy as np

from ..errors import CharlmError

MAX_CODE_POINT = 0x110000


class Vocab:
    """Maps characters (code points) to ids 0..size-1 and back."""

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
        return self._lookup[ord(char)] >= 0

    def ids_of(self, points: np.ndarray) -> np.ndarray:
        """The id of each code point in ``points``, -1 where the vocabulary lacks it."""
        return self._lookup[points]

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` missing from the vocabulary, in order of appearance."""
        points = code_points(text)
        return list(dict.fromkeys(map(chr, points[self.ids_of(points) < 0].tolist())))

    def encode(self, text: str, skip_unknown: bool = False) -> np.ndarray:
        ids = self.ids_of(code_points(text))
        if (ids < 0).any():
            if not skip_unknown:
                raise KeyError(self.unknown(text))
            ids = ids[ids >= 0]
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def describe_chars(chars: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def unknown_characters(source: str, chars: list[str], remedy: str) -> CharlmError:
    """The one-line error for text with characters a model never saw, naming them."""
    return CharlmError(f"{source} has characters the model never saw: {describe_chars(chars)}; {remedy}")
