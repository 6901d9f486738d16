"""Line-level readers shared by the loaders: missing files, headers and malformed lines reported uniformly."""
from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd

from .errors import DataPrepError, MalformedLines


def require_file(path: str | Path | None, what: str, parameter: str) -> Path:
    if path is None or str(path).strip() == "":
        raise DataPrepError(f"parameter {parameter} is not set; expected the path of {what}")
    p = Path(path)
    if not p.is_file():
        raise DataPrepError(f"{p}: file not found; expected {what} (parameter {parameter})")
    return p


def open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors="replace", newline="")
    return open(path, encoding=encoding, errors="replace", newline="")


def numbered_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    with open_text(path, encoding) as f:
        for no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield no, line


def read_table(
    path: Path,
    columns: list[str],
    parse: dict[str, Callable[[str], object]],
    bad: MalformedLines,
    sep: str = ",",
    header: bool | str = False,
    encoding: str = "utf-8",
    min_fields: int | None = None,
) -> pd.DataFrame:
    """Parse a delimited file into ``columns``; a line with the wrong field count or a value ``parse``
    cannot convert is malformed (skipped and counted, or fatal, per ``bad.policy``).

    ``header``: False (no header), True (a header that must hold ``columns``), or "auto" (a first line whose
    fields are exactly ``columns`` is a header). ``sep=","`` uses the csv module (quoted fields);
    other separators split literally (MovieLens ``::``, ``\\t``, ``|``).
    """
    n = len(columns)
    need = min_fields if min_fields is not None else n
    rows: list[list[object]] = []
    order = list(range(n))
    with open_text(path, encoding) as f:
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
    return pd.DataFrame(rows, columns=columns)


def to_int(x: str) -> int:
    return int(x.strip())


def to_float(x: str) -> float:
    return float(x.strip())
