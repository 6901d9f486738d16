"""What each recommender of the evaluation table cost: the Markdown section of seconds and ms per evaluated
user (decoding for an LM stage, fitting and scoring for a baseline), with where a stage's rows came from when
it was not decoded, and the matching MLflow scalars."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

HEADING = "## Time per model"


def timing_markdown(models: Sequence[dict[str, Any]]) -> str:
    """The timing section for the run info's ``models`` entries that were timed ("" when none was)."""
    timed = [m for m in models if "seconds" in m]
    if not timed:
        return ""
    lines = [HEADING, "",
             "Seconds to produce each model's recommendations for every evaluated user: constrained decoding for "
             "an LM stage, fitting and scoring for a baseline.", "",
             "| model | seconds | ms / user | note |", "|---|---|---|---|"]
    for m in timed:
        if m.get("reused_from"):
            lines.append(f"| {m['model']} | – | – | {m.get('note', '')} |")
        else:
            lines.append(f"| {m['model']} | {m['seconds']:.1f} | {m['ms_per_user']:.1f} | {m.get('note', '')} |")
    return "\n".join(lines) + "\n"


def insert_section(markdown: str, section: str, before: Sequence[str] = ("## Ties cut", "## Skipped")) -> str:
    """`section` placed before the first heading of `before` in `markdown`, else at its end."""
    if not section:
        return markdown
    found = [i for h in before if (i := markdown.find("\n" + h)) >= 0]
    cut = min(found) + 1 if found else len(markdown)
    head, tail = markdown[:cut], markdown[cut:]
    if head and not head.endswith("\n\n"):
        head = head.rstrip("\n") + "\n\n"
    return head + section.rstrip("\n") + "\n" + ("\n" + tail if tail else "")


def timing_scalars(models: Sequence[dict[str, Any]], key: Callable[..., str]) -> dict[str, float]:
    """MLflow scalars time/<model>/{seconds, ms_per_user, train_seconds} of the timed models (a reused stage
    logs 0 s: it was not decoded)."""
    out = {}
    for m in models:
        for name in ("seconds", "ms_per_user", "train_seconds"):
            if name in m:
                out[key("time", m["model"], name)] = float(m[name])
    return out
