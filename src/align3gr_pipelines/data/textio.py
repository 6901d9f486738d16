"""Line-level readers shared by the loaders: missing files, headers, malformed lines and undecodable bytes
reported uniformly.

Every text file a loader reads goes through :func:`decoded_lines`, which decodes the bytes itself (a block at
a time, line by line in a block that fails) so that an invalid byte can be reported with its line and byte
offset (a text-mode file object only says "position 8191" of some chunk), and so that ``replace`` can count
what it replaced.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import DataPrepError, MalformedLines

DECODE_POLICIES = ("raise", "replace")
# Split after a lone CR too: `open(newline="")`, which the loaders used before, treats \r, \n and \r\n
# alike, and csv.reader needs the same lines to number its records as before.
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")
_BLOCK = 1 << 20  # bytes decoded at once on the fast path


def check_encoding(encoding: object, parameter: str) -> str:
    """``encoding`` must name a codec in which CR and LF are the ASCII bytes: lines are split as bytes."""
    if not isinstance(encoding, str) or not encoding.strip():
        raise DataPrepError(f"parameter {parameter} must be a codec name such as utf-8 or latin-1, got {encoding!r}")
    try:
        codecs.lookup(encoding)
        ascii_lines = "a\r\n".encode(encoding).endswith(b"a\r\n")
    except (LookupError, UnicodeError) as exc:
        raise DataPrepError(f"parameter {parameter}: unknown text encoding {encoding!r} ({exc})") from exc
    if not ascii_lines:
        raise DataPrepError(
            f"parameter {parameter}: encoding {encoding!r} is not ASCII-compatible (e.g. UTF-16); expected an "
            "encoding such as utf-8, latin-1 or cp1252 (convert the file to UTF-8 first)"
        )
    return encoding


@dataclass
class TextDecoding:
    """How one source's text files are decoded, and how many invalid byte sequences ``replace`` replaced.

    ``encoding`` None means each file's own default (the release's encoding, chosen by the loader);
    ``on_error`` is ``data_prep.on_decode_error``; ``parameter`` names the encoding parameter in messages.
    """

    encoding: str | None = None
    on_error: str = "raise"
    parameter: str = "data_prep.<source>.encoding"
    replaced: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_error not in DECODE_POLICIES:
            raise DataPrepError(
                f"parameter data_prep.on_decode_error must be one of {list(DECODE_POLICIES)}, got {self.on_error!r}"
            )
        if self.encoding is not None:
            check_encoding(self.encoding, self.parameter)

    def codec(self, default: str) -> str:
        return self.encoding or default


def warn_replaced(text: TextDecoding, log: logging.Logger) -> dict[str, int]:
    """Log each file in which ``replace`` replaced bytes; the counts, for the loader's report."""
    for path, n in sorted(text.replaced.items()):
        log.warning("%s: replaced %d undecodable byte sequence(s) with U+FFFD (data_prep.on_decode_error: replace; "
                    "check %s)", path, n, text.parameter)
    return dict(sorted(text.replaced.items()))


def require_file(path: str | Path | None, what: str, parameter: str) -> Path:
    if path is None or str(path).strip() == "":
        raise DataPrepError(f"parameter {parameter} is not set; expected the path of {what}")
    p = Path(path)
    if not p.is_file():
        raise DataPrepError(f"{p}: file not found; expected {what} (parameter {parameter})")
    return p


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _split_lone_cr(lines: list[bytes]) -> Iterator[bytes]:
    for raw in lines:
        if b"\r" in raw:
            yield from (part for part in _LONE_CR.split(raw) if part)
        else:
            yield raw


def _byte_lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes, terminators kept (a ``.gz`` file decompressed)."""
    with _open_bytes(path) as f:
        yield from _split_lone_cr(f)


def _replace_invalid(raw: bytes, codec: str) -> tuple[str, int]:
    """``raw.decode(codec, errors="replace")`` and how many U+FFFD it put in."""
    parts: list[str] = []
    n = 0
    while True:
        try:
            parts.append(raw.decode(codec))
            return "".join(parts), n
        except UnicodeDecodeError as exc:
            parts.append(raw[: exc.start].decode(codec))
            parts.append("\ufffd")
            n += 1
            raw = raw[exc.end:]


def decoded_lines(path: Path, text: TextDecoding, default: str = "utf-8") -> Iterator[str]:
    """Every line of ``path`` decoded, terminators kept; an invalid byte raises with the file, line number
    and byte offset, or (``on_error: replace``) becomes U+FFFD and is counted in ``text.replaced``."""
    codec = text.codec(default)
    no = offset = 0
    with _open_bytes(path) as f:
        while block := f.readlines(_BLOCK):
            data = b"".join(block)
            try:
                # The common case, decoded a block at a time in C. Blocks end at a LF, so no character is
                # cut in two (the encoding is ASCII-compatible), and StringIO(newline="") splits lines as
                # the byte path below does.
                decoded = data.decode(codec)
            except UnicodeDecodeError:
                pass
            else:
                for line in io.StringIO(decoded, newline=""):
                    no += 1
                    yield line
                offset += len(data)
                continue
            for raw in _split_lone_cr(block):
                no += 1
                try:
                    line = raw.decode(codec)
                except UnicodeDecodeError as exc:
                    if text.on_error == "raise":
                        raise DataPrepError(_decode_message(path, no, offset + exc.start, raw[exc.start:exc.end],
                                                            exc.reason, codec, text.parameter)) from exc
                    line, n = _replace_invalid(raw, codec)
                    text.replaced[str(path)] = text.replaced.get(str(path), 0) + n
                offset += len(raw)
                yield line


def _decode_message(path: Path, no: int, offset: int, bad: bytes, reason: str, codec: str, parameter: str) -> str:
    where = "byte offset" if path.suffix != ".gz" else "byte offset (decompressed)"
    fix = ("; set the file's encoding there, or data_prep.on_decode_error: replace to replace such bytes with "
           "U+FFFD and count them") if parameter.startswith("data_prep.") else ""
    return (f"{path}, line {no}, {where} {offset}: invalid {codec} byte(s) {bad!r} ({reason}); "
            f"expected {codec} text (parameter {parameter}){fix}")


def read_text(path: Path, text: TextDecoding, default: str = "utf-8") -> str:
    """The whole file, decoded as :func:`decoded_lines` does (line numbers in later errors stay right)."""
    return "".join(decoded_lines(path, text, default))


def first_line(path: Path, text: TextDecoding, default: str = "utf-8") -> str:
    """The first line, for sniffing a header; invalid bytes are left to the full read that follows
    (which raises or counts them once)."""
    for raw in _byte_lines(path):
        return raw.decode(text.codec(default), errors="replace")
    return ""


def numbered_lines(path: Path, text: TextDecoding, default: str = "utf-8") -> Iterator[tuple[int, str]]:
    for no, line in enumerate(decoded_lines(path, text, default), start=1):
        line = line.rstrip("\r\n")
        if line.strip():
            yield no, line


def read_table(
    path: Path,
    columns: list[str],
    parse: dict[str, Callable[[str], object]],
    bad: MalformedLines,
    text: TextDecoding,
    sep: str = ",",
    header: bool | str = False,
    encoding: str = "utf-8",
    min_fields: int | None = None,
) -> pd.DataFrame:
    """Parse a delimited file into ``columns``; a line with the wrong field count or a value ``parse``
    cannot convert is malformed (skipped and counted, or fatal, per ``bad.policy``).

    ``header``: False (no header), True (a header that must hold ``columns``), or "auto" (a first line whose
    fields are exactly ``columns`` is a header). ``sep=","`` uses the csv module (quoted fields);
    other separators split literally (MovieLens ``::``, ``\\t``, ``|``). ``encoding`` is the file's own
    default, used unless ``text`` sets one for the whole source.
    """
    n = len(columns)
    need = min_fields if min_fields is not None else n
    rows: list[list[object]] = []
    order = list(range(n))
    f = decoded_lines(path, text, encoding)
    try:
        if sep == ",":
            lines: Iterator = ((i, fields) for i, fields in enumerate(csv.reader(f), start=1))
        else:
            lines = ((i, ln.rstrip("\r\n").split(sep)) for i, ln in enumerate(f, start=1))
        first = True
        for no, fields in lines:
            if not fields or all(not x.strip() for x in fields):
                continue
            if first:
                first = False
                names = [x.strip().lstrip("\ufeff") for x in fields]
                if header is True or (header == "auto" and set(columns) <= set(names)):
                    missing = [c for c in columns if c not in names]
                    if missing:
                        raise DataPrepError(
                            f"{path}: header lacks column(s) {missing}; expected columns {columns}, found {names}"
                        )
                    order = [names.index(c) for c in columns]
                    need = max(order) + 1
                    continue
            if len(fields) < need or (min_fields is None and header is False and len(fields) != n):
                bad.bad(no, f"expected {n} fields separated by {sep!r}, found {len(fields)}")
                continue
            row = []
            try:
                for c, k in zip(columns, order):
                    value = fields[k]
                    row.append(parse[c](value) if c in parse else value)
            except (ValueError, TypeError) as exc:
                bad.bad(no, f"column {c}: cannot parse {value!r} ({exc})")
                continue
            rows.append(row)
    finally:
        f.close()  # closes the file now, also when a check above raised
    return pd.DataFrame(rows, columns=columns)


def to_int(x: str) -> int:
    return int(x.strip())


def to_float(x: str) -> float:
    return float(x.strip())
