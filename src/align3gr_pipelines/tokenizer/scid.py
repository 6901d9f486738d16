"""SCID token strings: one token per level, user and item codes never share a token.

Item level l, code c -> ``<i{l}_{c}>``; user level l, code c -> ``<u{l}_{c}>``. A SCID's token string is
its level tokens concatenated with no separator, e.g. ``<i0_12><i1_200><i2_5>``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN_RE = re.compile(r"<([iu])(\d+)_(\d+)>")
KINDS = {"item": "i", "user": "u"}


def scid_token(kind: str, level: int, code: int) -> str:
    return f"<{KINDS[kind]}{level}_{code}>"


def codes_to_tokens(codes: Sequence[int], kind: str) -> str:
    """``[12, 200, 5]`` -> ``'<i0_12><i1_200><i2_5>'`` for kind='item'."""
    return "".join(scid_token(kind, level, int(code)) for level, code in enumerate(codes))


def split_tokens(tokens: str) -> list[str]:
    """``'<i0_12><i1_200>'`` -> ``['<i0_12>', '<i1_200>']``."""
    return [m.group(0) for m in _TOKEN_RE.finditer(tokens)]


def tokens_to_codes(tokens: str) -> list[int]:
    return [int(m.group(3)) for m in _TOKEN_RE.finditer(tokens)]


def vocabulary(kind: str, codebook_sizes: Sequence[int]) -> list[str]:
    """Every token a SCID of this kind can use, level by level."""
    return [scid_token(kind, level, code) for level, size in enumerate(codebook_sizes) for code in range(size)]
