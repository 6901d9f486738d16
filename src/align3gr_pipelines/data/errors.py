"""One error type for bad input, so callers can tell a data problem from a bug."""
from __future__ import annotations


class DataPrepError(ValueError):
    """Bad input to data_prep: the message names the file, column or parameter and what was expected."""


class MalformedLines:
    """Counts stray malformed lines of one file; with policy ``fail`` the first one raises.

    ``policy`` is the ``data_prep.malformed_lines`` parameter: ``skip`` (count, log, go on) or ``fail``.
    """

    def __init__(self, path: str, policy: str) -> None:
        if policy not in ("skip", "fail"):
            raise DataPrepError(
                f"parameter data_prep.malformed_lines must be 'skip' or 'fail', got {policy!r}"
            )
        self.path = str(path)
        self.policy = policy
        self.count = 0
        self.examples: list[str] = []

    def bad(self, line_no: int, reason: str) -> None:
        if self.policy == "fail":
            raise DataPrepError(
                f"{self.path}, line {line_no}: {reason} "
                "(set data_prep.malformed_lines: skip to drop such lines and count them)"
            )
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"line {line_no}: {reason}")
