"""Multi-task SFT examples over SCID tokens (Align3GR stage 2), one builder per task.

Each builder turns the canonical tables into a pool of (prompt, response) examples; `build_sft_examples`
switches tasks on or off, samples each pool to its share of the training set and appends the validation
SEQ examples. Everything is deterministic under the seed: each task draws from its own generator, seeded
by (seed, task name), so switching one task off does not reshuffle the others.

No leakage: every user-specific training example comes from the user's *training period* only — the
interactions before their valid position (`train_sequences` rows, `feedback` rows with split == "train",
reviews of training-period interactions). A last guard drops any training example whose target is the
user's valid or test item, and `leakage_report` checks the finished table.

Derived texts, for data that has no search queries or preference descriptions (all from training-period
interactions):

* **intention query** for (user, item): the item's leaf category ("something in keyboards & pianos"), its
  brand ("by Redfern") and, when the user reviewed that interaction and did not rate it below
  `query_min_rating`, the first clause of the review (at most `query_review_words` words), e.g.
  "something in keyboards & pianos by Redfern; absolutely love this midi keyboard". Never the title, which
  would make search a copy task.
* **preference text** for a user: their top categories (leaf categories, counted over the items they liked,
  most frequent first, ties by name), their most frequent liked brand, and the top category among disliked
  items that is not also a liked one. "Liked"/"disliked" are `feedback` levels of the training period; a
  user with no feedback counts every training-period interaction as liked. Without categories or brands,
  the titles of the last liked items stand in.
"""
from __future__ import annotations

import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from align3gr_pipelines.sft.prompts import ITEM_RESPONSE_TASKS, TEMPLATES, n_templates, render, seq_prompt, user_field
from align3gr_pipelines.tokenizer.scid import split_tokens

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS = ["task", "template_id", "prompt", "response", "user_id", "split", "target_item_id"]
EVAL_COLUMNS = ["user_id", "split", "prompt", "target", "target_tokens", "position"]
TASKS = tuple(TEMPLATES)


def _require(df: pd.DataFrame, name: str, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"sft_data: input table '{name}' lacks column(s) {missing}; it has {list(df.columns)}")


def _words(text: Any, limit: int) -> str:
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    words = str(text).split()
    return " ".join(words[:limit])


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    return str(value).strip()


def _category_list(categories: str) -> list[str]:
    return [c.strip() for c in categories.split(",") if c.strip()]


def _leaf_category(categories: str) -> str:
    parts = _category_list(categories)
    return parts[-1] if parts else ""


CATEGORY_SOURCES = ("leaf", "user_dominant")


def _first_clause(review: str, limit: int) -> str:
    clause = re.split(r"[.!?;\n]", review.strip(), maxsplit=1)[0]
    return _words(clause, limit).lower().strip(" ,")


def scid_map(scids: pd.DataFrame, name: str) -> dict[str, str]:
    """id -> SCID token string, checked against the contract (`id`, `tokens`, one token per level)."""
    _require(scids, name, ["id", "tokens"])
    ids = scids["id"].astype(str)
    if ids.duplicated().any():
        raise ValueError(f"sft_data: '{name}' has duplicate ids, e.g. {ids[ids.duplicated()].iloc[0]!r}")
    tokens = scids["tokens"].astype(str)
    bad = [t for t in tokens.head(1000) if "".join(split_tokens(t)) != t]
    if bad:
        raise ValueError(f"sft_data: '{name}.tokens' must be SCID token strings like '<i0_1><i1_2>', got {bad[0]!r}")
    return dict(zip(ids, tokens))


@dataclass
class Context:
    """What every builder needs, indexed once."""

    item_tokens: dict[str, str]
    user_tokens: dict[str, str]
    titles: dict[str, str]
    item_texts: dict[str, str]
    leaf: dict[str, str]
    brand: dict[str, str]
    profiles: dict[str, str]
    train_rows: pd.DataFrame  # train_sequences restricted to the chosen targets
    train_history: dict[str, list[str]]  # user -> training-period items, oldest first
    liked: dict[str, list[str]]  # user -> training-period liked items, oldest first
    disliked: dict[str, list[str]]
    reviews: dict[tuple[str, str], tuple[str, float]]  # (user, item) -> (review, rating) in the training period
    heldout: dict[str, set[str]]  # user -> valid/test target items
    params: Mapping[str, Any]
    inject_user: bool
    # item -> every category of the item (flat genres on MovieLens; the path on Amazon)
    categories: dict[str, list[str]] | None = None
    # user -> category counts over the user's liked training-period items (category_source user_dominant)
    taste: dict[str, Counter] | None = None
    item_counts: dict[str, int] | None = None  # item -> training-period interactions (all users)

    def user(self, user_id: str) -> str:
        return user_field(self.user_tokens.get(user_id) if self.inject_user else None)

    def history_scids(self, history: Sequence[str]) -> str:
        recent = list(history)[-int(self.params["max_history"]) :]
        return ", ".join(self.item_tokens[i] for i in recent)

    def history_list(self, history: Sequence[str]) -> list[str]:
        return [self.item_tokens[i] for i in list(history)[-int(self.params["max_history"]) :]]


def build_context(
    items: pd.DataFrame,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    train_sequences: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame,
    feedback: pd.DataFrame,
    item_scids: pd.DataFrame,
    user_scids: pd.DataFrame,
    params: Mapping[str, Any],
) -> Context:
    _require(items, "items", ["item_id", "title", "brand", "categories"])
    _require(users, "users", ["user_id", "profile"])
    _require(interactions, "interactions", ["user_id", "item_id", "timestamp", "rating", "review"])
    for name, df in (("train_sequences", train_sequences), ("valid", valid), ("test", test)):
        _require(df, name, ["user_id", "history", "target", "position"])
    _require(feedback, "feedback", ["user_id", "item_id", "level", "split"])

    item_tokens = scid_map(item_scids, "item_scids")
    user_tokens = scid_map(user_scids, "user_scids") if len(user_scids) else {}
    for name, df in (("train_sequences", train_sequences), ("valid", valid), ("test", test)):
        used = set(df["target"].astype(str))
        for hist in df["history"]:
            used.update(str(i) for i in hist)
        unknown = used - item_tokens.keys()
        if unknown:
            raise ValueError(
                f"sft_data: {len(unknown)} item(s) of '{name}' have no SCID in 'item_scids' "
                f"(e.g. {sorted(unknown)[:3]}); rerun tokenization on the same data_prep outputs"
            )

    items = items.assign(item_id=items["item_id"].astype(str))
    titles = {i: _words(t, int(params["title_max_words"])) for i, t in zip(items["item_id"], items["title"])}
    brand = {i: _clean(b) for i, b in zip(items["item_id"], items["brand"])}
    leaf = {i: _leaf_category(_clean(c)) for i, c in zip(items["item_id"], items["categories"])}
    categories = {i: _category_list(_clean(c)) for i, c in zip(items["item_id"], items["categories"])}
    item_texts = {}
    for i, c in zip(items["item_id"], items["categories"]):
        parts = [titles[i]] + ([f"by {brand[i]}"] if brand[i] else []) + ([f"in {_clean(c)}"] if _clean(c) else [])
        item_texts[i] = _words(", ".join(p for p in parts if p), int(params["item_text_max_words"]))
    profiles = {
        str(u): _words(p, int(params["profile_max_words"])) for u, p in zip(users["user_id"], users["profile"])
    }

    # The training period of a user: interactions before their valid position in the chronological sequence.
    # (the first one: a suffix holdout has several valid cases per user)
    valid_pos = valid.assign(user_id=valid["user_id"].astype(str)).groupby("user_id")["position"].min().astype(int).to_dict()
    inter = interactions.assign(user_id=interactions["user_id"].astype(str), item_id=interactions["item_id"].astype(str))
    inter = inter.sort_values(["user_id", "timestamp"], kind="mergesort")
    inter["_pos"] = inter.groupby("user_id", sort=False).cumcount()
    limit = inter["user_id"].map(valid_pos)
    inter = inter[limit.notna() & (inter["_pos"] < limit.fillna(-1))]
    train_history = {u: list(g["item_id"]) for u, g in inter.groupby("user_id", sort=False)}
    reviews = {
        (u, i): (_clean(r), float(s) if pd.notna(s) else float("nan"))
        for u, i, r, s in zip(inter["user_id"], inter["item_id"], inter["review"], inter["rating"])
        if _clean(r)
    }

    fb = feedback.assign(user_id=feedback["user_id"].astype(str), item_id=feedback["item_id"].astype(str))
    fb = fb[fb["split"] == "train"]
    liked = {u: list(g["item_id"]) for u, g in fb[fb["level"] == "liked"].groupby("user_id", sort=False)}
    disliked = {u: list(g["item_id"]) for u, g in fb[fb["level"] == "disliked"].groupby("user_id", sort=False)}
    with_feedback = set(fb["user_id"])
    for u, hist in train_history.items():
        if u not in with_feedback:  # implicit data: every training-period interaction counts as liked
            liked[u] = list(hist)

    heldout: dict[str, set[str]] = {}
    for df in (valid, test):
        for u, t in zip(df["user_id"].astype(str), df["target"].astype(str)):
            heldout.setdefault(u, set()).add(t)

    source = category_source(params)
    taste = None
    if source == "user_dominant":
        taste = {u: Counter(c for i in items_ for c in categories.get(i, ())) for u, items_ in liked.items()}
    item_counts = Counter(i for hist in train_history.values() for i in hist)

    rows = train_sequences.assign(
        user_id=train_sequences["user_id"].astype(str), target=train_sequences["target"].astype(str)
    )
    rows = select_targets(rows, int(params.get("target_stride") or 1), params.get("targets_per_user"))

    return Context(
        item_tokens=item_tokens,
        user_tokens=user_tokens,
        titles=titles,
        item_texts=item_texts,
        leaf=leaf,
        brand=brand,
        profiles=profiles,
        train_rows=rows,
        train_history=train_history,
        liked=liked,
        disliked=disliked,
        reviews=reviews,
        heldout=heldout,
        params=params,
        inject_user=bool(params.get("inject_user_scid", True)),
        categories=categories,
        taste=taste,
        item_counts=dict(item_counts),
    )


def category_source(params: Mapping[str, Any]) -> str:
    """`sft_data.b1_category`: which category of an item B1's texts name (see parameters_sft_data.yml)."""
    source = params.get("b1_category", "leaf")
    if source not in CATEGORY_SOURCES:
        raise ValueError(f"sft_data.b1_category must be one of {CATEGORY_SOURCES}, got {source!r}")
    return source


def item_category(ctx: Context, user_id: str | None, item_id: str) -> str:
    """The category B1 names for `item_id`: its leaf (hierarchical catalogues such as Amazon's, where the
    leaf is the most specific), or with ``b1_category: user_dominant`` the item's category that `user_id`
    liked most often in training (flat genre lists such as MovieLens', where the last genre is only the
    alphabetically last; ties go to the category listed first)."""
    if ctx.taste is None or ctx.categories is None:
        return ctx.leaf.get(item_id, "")
    cats = ctx.categories.get(item_id) or []
    if not cats:
        return ""
    counts = ctx.taste.get(user_id, Counter()) if user_id is not None else Counter()
    return max(cats, key=lambda c: (counts.get(c, 0), -cats.index(c)))


def select_targets(rows: pd.DataFrame, stride: int, per_user: int | None) -> pd.DataFrame:
    """Training targets of each user, most recent first, every `stride`-th one, at most `per_user`.

    The most recent targets are the closest to what valid/test ask. With stride = max_history the chosen
    examples' histories tile the user's sequence without overlap: when sft_train also trains on the
    history tokens, every training transition is supervised once per epoch at a fraction of the tokens.
    """
    if stride < 1:
        raise ValueError(f"sft_data.target_stride must be >= 1, got {stride}")
    rows = rows.sort_values(["user_id", "position"], kind="mergesort")
    back = rows.groupby("user_id", sort=False).cumcount(ascending=False)  # 0 = the user's last target
    keep = back % stride == 0
    if per_user:
        keep &= back // stride < int(per_user)
    return rows[keep].reset_index(drop=True)


# ----------------------------------------------------------------------------------------- derived texts


def intention_query(ctx: Context, user_id: str, item_id: str) -> str:
    """A search intention for an item the user chose in training, from category, brand and their review."""
    parts = []
    category = item_category(ctx, user_id, item_id)
    if category:
        parts.append(f"something in {category.lower()}")
    if ctx.brand.get(item_id):
        parts.append(f"by {ctx.brand[item_id]}")
    review, rating = ctx.reviews.get((user_id, item_id), ("", float("nan")))
    low = float(ctx.params["query_min_rating"])
    if review and not (rating == rating and rating < low):  # NaN rating: an unrated review counts
        clause = _first_clause(review, int(ctx.params["query_review_words"]))
        if clause:
            if parts:
                parts[-1] += ";"
            parts.append(clause)
    return " ".join(parts)


def _top(counter: Counter, k: int, exclude: Iterable[str] = ()) -> list[str]:
    skip = set(exclude)
    ranked = sorted(((-n, name) for name, n in counter.items() if name and name not in skip))
    return [name for _, name in ranked[:k]]


def preference_text(ctx: Context, user_id: str) -> str:
    liked = ctx.liked.get(user_id, [])
    disliked = ctx.disliked.get(user_id, [])
    n_top = int(ctx.params["preference_top_categories"])
    if ctx.taste is not None and ctx.categories is not None:  # user_dominant: every genre of each item counts
        cats = _top(ctx.taste.get(user_id, Counter()), n_top)
        bad = _top(Counter(c for i in disliked for c in ctx.categories.get(i, ())), 1, exclude=cats)
    else:
        cats = _top(Counter(ctx.leaf.get(i, "") for i in liked), n_top)
        bad = _top(Counter(ctx.leaf.get(i, "") for i in disliked), 1, exclude=cats)
    brands = _top(Counter(ctx.brand.get(i, "") for i in liked), 1)
    if cats:
        text = "Enjoys " + " and ".join(cats)
    elif liked and any(ctx.titles.get(i) for i in liked):
        text = "Recently liked " + " and ".join(ctx.titles[i] for i in liked[-2:] if ctx.titles.get(i))
    else:
        return ""
    if brands:
        text += f", often from {brands[0]}"
    text += "."
    if bad:
        text += f" Tends to dislike {bad[0]}."
    return text


# ----------------------------------------------------------------------------------------------- builders


def _example(task: str, prompt: str, response: str, user_id: str | None, target: str | None) -> dict[str, Any]:
    return {"task": task, "prompt": prompt, "response": response, "user_id": user_id, "target_item_id": target}


def _history_examples(ctx: Context, task: str) -> list[dict[str, Any]]:
    """SEQ and its fused variants: one example per chosen training target."""
    out = []
    n_titles = int(ctx.params["max_history_titles"])
    for u, hist, target in zip(ctx.train_rows["user_id"], ctx.train_rows["history"], ctx.train_rows["target"]):
        hist = [str(i) for i in hist]
        if not hist:
            continue
        if task == "seq":
            out.append({**_example(task, "", ctx.item_tokens[target], u, target), "history": hist, "_item": target})
        elif task == "seq2text" and ctx.titles.get(target):
            out.append({**_example(task, "", ctx.titles[target], u, None), "history": hist, "_item": target})
        elif task == "titles2scid":
            names = [ctx.titles[i] for i in hist[-n_titles:] if ctx.titles.get(i)]
            if names:
                out.append({**_example(task, "", ctx.item_tokens[target], u, target), "titles": "; ".join(names), "_item": target})
    return out


def build_task_pool(ctx: Context, task: str) -> list[dict[str, Any]]:
    """Every candidate example of one task, before sampling; prompts are rendered later with a template."""
    if task in ("seq", "seq2text", "titles2scid"):
        return _history_examples(ctx, task)
    if task == "item_text2scid":
        return [
            {**_example(task, "", tok, None, i), "_item": i}
            for i, tok in ctx.item_tokens.items()
            if ctx.item_texts.get(i)
        ]
    if task == "item_scid2text":
        return [{**_example(task, "", ctx.titles[i], None, None), "_item": i} for i in ctx.item_tokens if ctx.titles.get(i)]
    if task == "intent_search":
        out = []
        for u, target in zip(ctx.train_rows["user_id"], ctx.train_rows["target"]):
            query = intention_query(ctx, u, target)
            if query:
                out.append({**_example(task, "", ctx.item_tokens[target], u, target), "query": query, "_item": target})
        return out
    if task == "preference":
        out = []
        for u, hist in ctx.train_history.items():
            text = preference_text(ctx, u)
            if text and hist:
                out.append({**_example(task, "", text, u, None), "history": hist})
        return out
    if task in ("user_text2scid", "user_scid2text"):
        if not ctx.user_tokens:
            return []  # item-only tokenization: no user SCIDs to align
        out = []
        for u in ctx.train_history:
            profile, tok = ctx.profiles.get(u), ctx.user_tokens.get(u)
            if profile and tok:
                if task == "user_text2scid":
                    out.append({**_example(task, "", tok, u, None), "profile": profile})
                else:
                    out.append({**_example(task, "", profile, u, None), "user_scid": tok})
        return out
    raise KeyError(f"sft_data: unknown task {task!r}; known tasks: {list(TASKS)}")


def _render(ctx: Context, ex: dict[str, Any], template_id: int) -> str:
    task, u = ex["task"], ex["user_id"]
    if task == "seq":
        history = ctx.history_list(ex["history"])
        return seq_prompt(history, ctx.user_tokens.get(u) if ctx.inject_user else None, template_id)
    fields: dict[str, str] = {"user": ctx.user(u) if u is not None else ""}
    if "history" in ex:
        fields["history"] = ctx.history_scids(ex["history"])
    if task == "titles2scid":
        fields["titles"] = ex["titles"]
    if task == "item_text2scid":
        fields["item_text"] = ctx.item_texts[ex["_item"]]
    if task == "item_scid2text":
        fields["item"] = ctx.item_tokens[ex["_item"]]
    if task == "intent_search":
        fields["query"] = ex["query"]
    if task == "user_text2scid":
        fields["profile"] = ex["profile"].rstrip(" .")  # the templates add their own punctuation
    if task == "user_scid2text":
        fields["user"] = ex["user_scid"]  # the SCID *is* the input here, injection switch or not
    return render(task, template_id, **fields)


C1_TASKS = ("item_text2scid", "item_scid2text")


def item_weights(ctx: Context, pool: Sequence[Mapping[str, Any]]) -> np.ndarray | None:
    """Sampling probabilities of a C1 pool's items under `sft_data.c1_item_sampling`: None = uniform (the
    paper: every item alike); ``frequency`` with ``temperature`` tau = (training interactions + 1) ** tau,
    so the items that users actually meet get aligned first (tau 1 = by frequency, 0 = uniform)."""
    cfg = ctx.params.get("c1_item_sampling") or {}
    kind = cfg.get("weighting", "uniform")
    if kind == "uniform":
        return None
    if kind != "frequency":
        raise ValueError(f"sft_data.c1_item_sampling.weighting must be 'uniform' or 'frequency', got {kind!r}")
    tau = float(cfg.get("temperature", 1.0))
    if tau < 0:
        raise ValueError(f"sft_data.c1_item_sampling.temperature must be >= 0, got {tau}")
    counts = ctx.item_counts or {}
    w = np.array([(counts.get(ex["_item"], 0) + 1.0) ** tau for ex in pool], dtype=np.float64)
    return w / w.sum()


def task_rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode())])


def _quotas(pools: Mapping[str, int], shares: Mapping[str, float], total: int | None) -> dict[str, int]:
    if total is None:
        return dict(pools)
    weight = sum(shares[t] for t in pools)
    if weight <= 0:
        raise ValueError("sft_data: the enabled tasks' shares sum to 0; give at least one task a positive share")
    return {t: min(pools[t], int(round(total * shares[t] / weight))) for t in pools}


def build_sft_examples(ctx: Context, valid: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The training examples of every enabled task, sampled to their shares, plus valid SEQ examples."""
    params = ctx.params
    task_params = params["tasks"]
    unknown = set(task_params) - set(TASKS)
    if unknown:
        raise ValueError(f"sft_data.tasks: unknown task(s) {sorted(unknown)}; known tasks: {list(TASKS)}")
    enabled = [t for t in TASKS if t in task_params and task_params[t].get("enabled", True)]
    if not enabled:
        raise ValueError("sft_data.tasks: every task is disabled; enable at least one")

    pools = {t: build_task_pool(ctx, t) for t in enabled}
    for t in enabled:
        if not pools[t]:
            log.warning("sft_data: task %s has no examples on this data (skipped)", t)
    shares = {t: float(task_params[t].get("share", 1.0)) for t in enabled}
    if any(s < 0 for s in shares.values()):
        raise ValueError(f"sft_data.tasks.*.share must be >= 0, got {shares}")
    total = params.get("max_train_examples")
    quotas = _quotas({t: len(p) for t, p in pools.items()}, shares, None if total is None else int(total))

    rows: list[dict[str, Any]] = []
    dropped_leaks = 0
    for t in enabled:
        rng = task_rng(seed, t)
        pool = pools[t]
        weights = item_weights(ctx, pool) if t in C1_TASKS else None
        if quotas[t] < len(pool):
            chosen = np.sort(rng.choice(len(pool), size=quotas[t], replace=False, p=weights))
        else:
            chosen = range(len(pool))
        templates = rng.integers(0, n_templates(t), size=len(pool))
        for k in chosen:
            ex = pool[k]
            item = ex.get("_item") if ex["user_id"] is not None else None
            if item is not None and item in ctx.heldout.get(ex["user_id"], ()):
                dropped_leaks += 1  # a repeated item: its held-out interaction must not become a training target
                continue
            rows.append(
                {**{c: ex[c] for c in ("task", "response", "user_id", "target_item_id")},
                 "template_id": int(templates[k]), "prompt": _render(ctx, ex, int(templates[k])), "split": "train"}
            )

    eval_template = int(params["eval_template_id"])
    for u, hist, target in zip(valid["user_id"].astype(str), valid["history"], valid["target"].astype(str)):
        prompt = seq_prompt(ctx.history_list([str(i) for i in hist]), ctx.user_tokens.get(u) if ctx.inject_user else None, eval_template)
        rows.append({"task": "seq", "template_id": eval_template, "prompt": prompt, "response": ctx.item_tokens[target],
                     "user_id": u, "target_item_id": target, "split": "valid"})

    df = pd.DataFrame(rows, columns=EXAMPLE_COLUMNS)
    df["template_id"] = df["template_id"].astype("int64")
    for c in ("task", "prompt", "response", "split"):
        df[c] = df[c].astype(str)
    # user_id / target_item_id stay as built: strings, missing (None/NaN) where a task has no user or item.
    counts = df[df["split"] == "train"]["task"].value_counts()
    stats = {
        "pool_sizes": {t: len(p) for t, p in pools.items()},
        "train_examples": {t: int(counts.get(t, 0)) for t in enabled},
        "valid_examples": int((df["split"] == "valid").sum()),
        "dropped_heldout_targets": dropped_leaks,
        "users_without_scid": int(sum(1 for u in ctx.train_history if u not in ctx.user_tokens)) if ctx.user_tokens else None,
        "inject_user_scid": ctx.inject_user,
    }
    return df, stats


def build_seq_eval_prompts(
    valid: pd.DataFrame, test: pd.DataFrame, item_scids: pd.DataFrame, user_scids: pd.DataFrame, params: Mapping[str, Any]
) -> pd.DataFrame:
    """Valid/test SEQ prompts exactly as `seq_prompt` builds them for training (evaluation phrasing)."""
    item_tokens = scid_map(item_scids, "item_scids")
    user_tokens = scid_map(user_scids, "user_scids") if len(user_scids) else {}
    inject = bool(params.get("inject_user_scid", True))
    template, keep = int(params["eval_template_id"]), int(params["max_history"])
    frames = []
    for split, df in (("valid", valid), ("test", test)):
        _require(df, split, ["user_id", "history", "target"])
        users, targets = df["user_id"].astype(str), df["target"].astype(str)
        missing = (set(targets) | {str(i) for h in df["history"] for i in h}) - item_tokens.keys()
        if missing:
            raise ValueError(f"sft_data: {len(missing)} item(s) of '{split}' have no SCID in 'item_scids', e.g. {sorted(missing)[:3]}")
        prompts = [
            seq_prompt([item_tokens[str(i)] for i in list(h)[-keep:]], user_tokens.get(u) if inject else None, template)
            for u, h in zip(users, df["history"])
        ]
        frame = pd.DataFrame({"user_id": users.to_numpy(), "split": split, "prompt": prompts,
                              "target": targets.to_numpy(), "target_tokens": [item_tokens[t] for t in targets]})
        # A suffix holdout has several cases per user: the held-out position tells them apart.
        frame["position"] = df["position"].astype("int64").to_numpy() if "position" in df.columns else -1
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)[EVAL_COLUMNS]


def leakage_report(examples: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame, item_scids: pd.DataFrame) -> dict[str, int]:
    """Counts training examples that mention a user's valid/test target (by id or SCID); all must be 0."""
    tokens = scid_map(item_scids, "item_scids")
    heldout: dict[str, set[str]] = {}
    for df in (valid, test):
        for u, t in zip(df["user_id"].astype(str), df["target"].astype(str)):
            heldout.setdefault(u, set()).add(t)
    train = examples[(examples["split"] == "train") & examples["user_id"].notna()]
    by_target = by_scid = 0
    for u, target, prompt, response in zip(train["user_id"], train["target_item_id"], train["prompt"], train["response"]):
        items = heldout.get(str(u), set())
        if pd.notna(target) and target in items:
            by_target += 1
        if any(tokens[i] in prompt or tokens[i] == response for i in items):
            by_scid += 1
    return {"target_is_heldout": by_target, "heldout_scid_in_text": by_scid}


__all__ = [
    "EXAMPLE_COLUMNS",
    "EVAL_COLUMNS",
    "ITEM_RESPONSE_TASKS",
    "TASKS",
    "Context",
    "build_context",
    "build_sft_examples",
    "build_seq_eval_prompts",
    "build_task_pool",
    "intention_query",
    "leakage_report",
    "preference_text",
    "select_targets",
]
