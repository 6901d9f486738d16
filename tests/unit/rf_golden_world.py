"""A seeded RF-DPO input (prompts, recommendations, levels) for the golden check of `build_feedback_pairs`.

`rf_pairs_golden.json` beside it holds the pairs and stats that the function built on this input before the
`rf_dpo.hard_stage` parameter existed (written once by `write_golden`); tests/unit/test_rf_hard_stage.py checks
that the default settings still build exactly them. The input mixes what the pair rules care about: futures
that repeat history items, liked / neutral / disliked / unrated items, targets that are not liked, users with no
recommendation, recommendations from the history.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

GOLDEN = Path(__file__).parent / "data" / "rf_pairs_golden.json"
CASES = [(stage, n, pad) for stage in ("easy", "hard", "mixed") for n in (2, 20) for pad in (False, True)]
ITEMS = [f"i{k}" for k in range(30)]
TOKENS = {i: f"<a_{k % 7}><b_{k}>" for k, i in enumerate(ITEMS)}
CODES = {i: [k % 7, k] for k, i in enumerate(ITEMS)}


def world(seed: int = 7, n_users: int = 16) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    prompts, recs, levels = [], [], []
    for u in range(n_users):
        user = f"u{u}"
        rated = rng.choice(ITEMS, size=int(rng.integers(4, 14)), replace=False).tolist()
        # per-user level mix, so that some users lack a liked future or a disliked / neutral one
        mix = rng.dirichlet([0.7, 0.7, 0.7])
        for t, item in enumerate(rated):
            levels.append({"user_id": user, "item_id": item, "level": str(rng.choice(["liked", "neutral", "disliked"], p=mix)),
                           "timestamp": t})
        cut = int(rng.integers(1, len(rated) - 1))
        history, target = rated[:cut], rated[cut]
        # the future may repeat history items and hold unrated ones: both must be filtered the same way
        future = rated[cut + 1 :] + [history[0], str(rng.choice(ITEMS))]
        prompts.append({"user_id": user, "prompt": f"p{u}", "history": history, "target": target,
                        "position": cut, "future": future})
        if u % 5 != 4:  # some users get no recommendation at all
            for rank, item in enumerate(rng.choice(ITEMS, size=10, replace=False).tolist()):
                recs.append({"user_id": user, "rank": rank, "item_id": item})
    return pd.DataFrame(prompts), pd.DataFrame(recs), pd.DataFrame(levels)


def as_json(pairs: pd.DataFrame, stats: dict[str, float]) -> dict[str, Any]:
    records = [{k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in row.items()}
               for row in pairs.to_dict("records")]
    return {"pairs": json.loads(json.dumps(records, default=int)), "stats": stats}


def write_golden() -> None:
    from align3gr_pipelines.preference.feedback_pairs import build_feedback_pairs

    prompts, recs, levels = world()
    out = {f"{stage}/{n}/{pad}": as_json(*build_feedback_pairs(prompts, recs, levels, stage, n, pad, TOKENS, CODES))
           for stage, n, pad in CASES}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
