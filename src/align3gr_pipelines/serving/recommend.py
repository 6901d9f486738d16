"""The trained recommender as a user calls it: item history (+ optional user id) -> constrained top-K.

`Recommender` wraps one LM checkpoint (a `RecLM`) with the item catalogue (`item_scids`), the item titles
(`items`) and the user SCIDs. A request is rendered into the SEQ prompt exactly as `sft_data` renders
`seq_eval_prompts` (same `prompts.seq_prompt`, the same history cut, phrasing and user-SCID injection), and
decoded by the evaluation stage's constrained beam search over the catalogue's valid SCIDs, so a request
for an evaluation user's history gets the list evaluation scored. As in evaluation, items of the history
are not filtered out of the answer.

Every request is checked before anything is decoded, by one function (`parse_requests`) that the Python
API, the Kedro `inference` pipeline, the MLflow pyfunc and the HTTP server all call: an unknown or
misspelt field (the closest valid name is suggested), a history that is not a list, an unknown item id,
an empty or over-long history, too many requests in one call, a K outside 1..catalogue size raises
`RequestError`, whose message names the request and the problem first and quotes at most a short prefix
of any value it received (a hostile request is never echoed back whole).

The same class backs the Python API, the Kedro `inference` pipeline and the MLflow pyfunc
(`recommender_model.py`), so the three give identical lists for the same request. A request's list does
not depend on the other requests decoded with it; only its scores may differ in the last float bits when
left padding in a batch differs.

`ranker` picks what orders the list: ``lm`` (the default) is the LM's constrained beam, as evaluation's LM
rows; ``align3gr_cf`` is the hybrid of `evaluation.hybrid_ranker` (the beam ∪ SASRec's top-``cf_candidates``,
scored by the LM's exact log-probability + ``cf_weight`` × SASRec's log-softmax), as evaluation's
`align3gr_cf` row, with the weight evaluation chose on valid users set by hand in the parameters.
"""
from __future__ import annotations

import difflib
import itertools
import json
import logging
import numbers
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from align3gr_pipelines.evaluation.hybrid_ranker import MODEL as HYBRID
from align3gr_pipelines.evaluation.hybrid_ranker import RANKERS, check_weight, rank_candidates, score_candidates, weight_label
from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog
from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.lm.sharded_decoding import decode_prompts_sharded
from align3gr_pipelines.sft.prompts import seq_prompt

log = logging.getLogger(__name__)

# LM checkpoints under 06_models, newest DAG stage first: (label as in the evaluation table, directory).
CHECKPOINTS: tuple[tuple[str, str], ...] = (
    ("rf_dpo_hard", "rf_dpo_hard"),
    ("rf_dpo_easy", "rf_dpo_easy"),
    ("sp_dpo_hard", "sp_dpo_hard"),
    ("sp_dpo_medium", "sp_dpo_medium"),
    ("sp_dpo_easy", "sp_dpo_easy"),
    ("sft", "sft_model"),
)
# Written last by CheckpointDataset: a directory without it is an interrupted save, never a checkpoint.
COMPLETE_MARKER = "_CHECKPOINT_COMPLETE.json"
OUTPUT_COLUMNS = ["request_id", "user_id", "rank", "item_id", "title", "score", "model"]
UNKNOWN_USER_MODES = ("anonymous", "error")
REQUEST_FIELDS = ("history", "user_id", "k")
# Longest quoted value in an error message: enough to recognise it, never a copy of a hostile input.
QUOTE_CHARS = 60


class RequestError(ValueError):
    """A request the recommender cannot answer; the message names the request and what is wrong."""


@dataclass(frozen=True)
class PromptSettings:
    """How a history becomes a SEQ prompt; must equal what `sft_data` used for `seq_eval_prompts`."""

    max_history: int
    template_id: int = 0
    inject_user_scid: bool = True

    @classmethod
    def from_sft_data(cls, params: Mapping[str, Any]) -> "PromptSettings":
        """From the `sft_data` parameters (max_history, eval_template_id, inject_user_scid)."""
        return cls(int(params["max_history"]), int(params.get("eval_template_id", 0)), bool(params.get("inject_user_scid", True)))


@dataclass(frozen=True)
class RequestLimits:
    """What one call may ask for. Only the last `max_history` items (params:sft_data) reach the prompt, so a
    longer history is accepted up to `max_history_items` and cut; beyond that it is a client bug or an
    attack. `max_requests` bounds the work of one call (null: no bound, as for the offline requests table)."""

    max_requests: int | None = 256
    max_history_items: int = 1000

    def __post_init__(self) -> None:
        if self.max_requests is not None and int(self.max_requests) < 1:
            raise ValueError(f"max_requests must be >= 1 or null, got {self.max_requests!r}")
        if int(self.max_history_items) < 1:
            raise ValueError(f"max_history_items must be >= 1, got {self.max_history_items!r}")


@dataclass(frozen=True)
class Request:
    history: list[str]
    k: int
    user_id: str | None = None


def quote(value: Any) -> str:
    """A short repr of ``value`` for an error message: long strings, lists and nestings are elided (reprlib
    never walks more than a few elements), so the message never grows with what a client sent."""
    text = _QUOTER.repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}..."


def _quoter() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxstring = r.maxother = 40
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 5
    r.maxlevel = 2
    return r


_QUOTER = _quoter()


def _complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def resolve_checkpoint(models_dir: str | Path, checkpoint: str | None = None) -> tuple[str, Path]:
    """(stage label, directory) of the checkpoint to serve. ``checkpoint`` None picks the newest complete
    stage in DAG order (rf_dpo_hard, rf_dpo_easy, sp_dpo_hard, ..., sft); a stage label ('sp_dpo_easy'),
    a directory name under ``models_dir`` ('sft_model') or a path to a checkpoint directory picks one."""
    root = Path(models_dir)
    if checkpoint is None:
        for label, name in CHECKPOINTS:
            if _complete(root / name):
                return label, root / name
        looked = ", ".join(name for _, name in CHECKPOINTS)
        raise FileNotFoundError(f"no complete LM checkpoint in {root} (looked for {looked}); run sft_train first")
    by_label = dict(CHECKPOINTS)
    names = {name: label for label, name in CHECKPOINTS}
    if checkpoint in by_label:
        label, path = checkpoint, root / by_label[checkpoint]
    elif checkpoint in names:
        label, path = names[checkpoint], root / checkpoint
    else:
        path = Path(checkpoint)
        label = names.get(path.name, path.name)
    if not _complete(path):
        raise FileNotFoundError(
            f"checkpoint {checkpoint!r}: no complete checkpoint at {path} (missing {COMPLETE_MARKER}); "
            f"known stages: {[label for label, _ in CHECKPOINTS]}"
        )
    return label, path


def _as_item_id(value: Any, where: str) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    raise RequestError(f"{where}: item ids must be non-empty strings or integers, got {quote(value)}")


def _unknown_fields(raw: Mapping[str, Any], where: str) -> None:
    unknown = [f for f in raw if f not in REQUEST_FIELDS]
    if not unknown:
        return
    guesses = {}
    for field in unknown[:5]:
        # Case-insensitive: "K" and "User_ID" are the commonest slips.
        close = difflib.get_close_matches(str(field).lower(), REQUEST_FIELDS, n=1, cutoff=0.5)
        if close:
            guesses[quote(field)] = repr(close[0])
    shown = "[" + ", ".join(quote(f) for f in unknown[:5]) + (f", ... {len(unknown)} in all" if len(unknown) > 5 else "") + "]"
    if len(guesses) == 1 and len(unknown) == 1:
        hint = f" (did you mean {next(iter(guesses.values()))}?)"
    else:
        hint = f" (did you mean {', '.join(f'{g} for {f}' for f, g in guesses.items())}?)" if guesses else ""
    raise RequestError(f"{where}: unknown field(s) {shown}{hint}; a request has 'history', 'user_id' (optional) and 'k'")


def _history(value: Any, where: str, max_items: int) -> list[str]:
    if isinstance(value, (str, bytes)):
        # list("123") would be three one-character item ids: refuse, and show the intended call.
        raise RequestError(f"{where}: 'history' must be a list of item ids, got {quote(value)} (a string; one item is [{quote(value)}])")
    if value is None or isinstance(value, (Mapping, set, frozenset)) or not isinstance(value, Iterable):
        missing = " (the field is missing or null)" if value is None else ""
        raise RequestError(f"{where}: 'history' must be a list of item ids, got {quote(value)}{missing}")
    head = list(itertools.islice(value, max_items + 1))  # never walks a huge iterable past the limit
    if len(head) > max_items:
        size = f"{len(value)} items" if isinstance(value, Sequence) else f"more than {max_items} items"
        raise RequestError(f"{where}: 'history' has {size}, more than the {max_items} a request may send (only the most recent items reach the prompt: send those)")
    items = [_as_item_id(i, f"{where}.history[{n}]") for n, i in enumerate(head)]
    if not items:
        raise RequestError(f"{where}: 'history' is empty; the recommender needs at least one item the user interacted with")
    return items


def parse_request(raw: Any, where: str = "request", limits: RequestLimits = RequestLimits()) -> Request:
    """A request from a mapping with `history` (list of item ids, oldest first), optional `user_id` and `k`."""
    if not isinstance(raw, Mapping):
        raise RequestError(f"{where}: expected an object with 'history', 'user_id' (optional) and 'k', got {type(raw).__name__} {quote(raw)}")
    _unknown_fields(raw, where)
    items = _history(raw.get("history"), where, int(limits.max_history_items))
    k = raw.get("k")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise RequestError(f"{where}: 'k' must be an integer >= 1, got {quote(k)}")
    user = _null_to_none(raw.get("user_id"))  # a missing cell of a table (NaN) is no user id
    if user is not None and not (isinstance(user, str) or (isinstance(user, numbers.Integral) and not isinstance(user, bool))):
        raise RequestError(f"{where}: 'user_id' must be a string, an integer or null, got {quote(user)}")
    return Request(history=items, k=int(k), user_id=None if user is None or user == "" else str(user))


def parse_requests(
    raw: Any, limits: RequestLimits = RequestLimits(), names: Sequence[str] | None = None, what: str = "requests"
) -> list[Request]:
    """The one validation of incoming requests (Python API, inference table, MLflow pyfunc, HTTP server):
    ``raw`` is a list of request mappings (or already parsed `Request`s); raises `RequestError` on the
    first problem, naming the request by ``names[n]`` (default "request n")."""
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise RequestError(f"{what}: expected a list of request objects, got {type(raw).__name__} {quote(raw)}")
    if limits.max_requests is not None and len(raw) > int(limits.max_requests):
        raise RequestError(f"{what}: {len(raw)} requests in one call, more than the {limits.max_requests} allowed; split them into several calls")
    where = list(names) if names is not None else [f"request {n}" for n in range(len(raw))]
    return [r if isinstance(r, Request) else parse_request(r, where[n], limits) for n, r in enumerate(raw)]


class Recommender:
    """Constrained top-K recommendations of one LM checkpoint over the item catalogue."""

    def __init__(
        self,
        rec_lm: RecLM,
        item_scids: pd.DataFrame,
        items: pd.DataFrame | None,
        user_scids: pd.DataFrame | None,
        prompt: PromptSettings,
        *,
        beam_width: int = 20,
        batch_size: int = 32,
        unknown_user: str = "anonymous",
        stage: str = "lm",
        limits: RequestLimits = RequestLimits(),
        ranker: str = "lm",
        sasrec: Any | None = None,
        cf_weight: float = 1.0,
        cf_candidates: int | None = None,
        decoding_nproc: int = 1,
        decoding_timeout_s: float | None = None,
    ) -> None:
        if ranker not in RANKERS:
            raise ValueError(f"ranker must be one of {list(RANKERS)}, got {ranker!r}")
        if ranker == HYBRID and sasrec is None:
            raise ValueError(f"ranker {HYBRID!r} needs the SASRec model (the tokenization stage's sasrec_model checkpoint); "
                             "run tokenization, or use ranker 'lm'")
        if cf_candidates is not None and int(cf_candidates) < 0:
            raise ValueError(f"cf_candidates must be >= 0 or null (null: beam_width), got {cf_candidates}")
        self.ranker, self.sasrec = ranker, sasrec if ranker == HYBRID else None
        self.cf_weight = check_weight(cf_weight)
        self.cf_candidates = int(beam_width if cf_candidates is None else cf_candidates)
        if unknown_user not in UNKNOWN_USER_MODES:
            raise ValueError(f"unknown_user must be one of {UNKNOWN_USER_MODES}, got {unknown_user!r}")
        if int(beam_width) < 1 or int(batch_size) < 1:
            raise ValueError(f"beam_width and batch_size must be >= 1, got {beam_width}, {batch_size}")
        if int(prompt.max_history) < 1:
            raise ValueError(f"max_history must be >= 1, got {prompt.max_history}")
        self.rec_lm, self.prompt, self.stage = rec_lm, prompt, stage
        self.checkpoint_dir: Path | None = None  # set when loaded from a checkpoint directory
        self.beam_width, self.batch_size, self.unknown_user = int(beam_width), int(batch_size), unknown_user
        self.limits = limits
        # Processes the LM's beam search runs on (lm/sharded_decoding.py; the same lists as 1). A runtime
        # setting of the offline pipeline, not of the model: `settings()` (saved with a logged model) leaves it out.
        self.decoding_nproc, self.decoding_timeout_s = decoding_nproc, decoding_timeout_s
        self.catalog = SCIDCatalog.from_scids(item_scids, rec_lm.tokenizer)
        self.item_tokens = dict(zip(self.catalog.item_ids, self.catalog.scid_strings or []))
        titles = {}
        if items is not None:
            missing = [c for c in ("item_id", "title") if c not in items.columns]
            if missing:
                raise ValueError(f"recommender: 'items' lacks column(s) {missing}")
            titles = dict(zip(items["item_id"].astype(str), items["title"].astype(str)))
        self.titles = titles
        self.user_tokens: dict[str, str] = {}
        if user_scids is not None and len(user_scids):
            missing = [c for c in ("id", "tokens") if c not in user_scids.columns]
            if missing:
                raise ValueError(f"recommender: 'user_scids' lacks column(s) {missing}")
            self.user_tokens = dict(zip(user_scids["id"].astype(str), user_scids["tokens"].astype(str)))

    @property
    def n_items(self) -> int:
        return self.catalog.n_items

    @property
    def label(self) -> str:
        """The `model` of the lists: the stage, marked when the hybrid ranks them."""
        return self.stage if self.ranker == "lm" else f"{self.stage}+{HYBRID}"

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, item_scids: pd.DataFrame, items: pd.DataFrame | None, user_scids: pd.DataFrame | None,
        prompt: PromptSettings, *, device: str | None = "auto", stage: str | None = None, dtype: str = "checkpoint",
        **kwargs: Any,
    ) -> "Recommender":
        path = Path(checkpoint)
        rec_lm = RecLM.from_pretrained(str(path), device=device, dtype=dtype)  # dtype: lm.precision
        if rec_lm.meta.get("skipped"):
            log.info("recommender: %s is a skipped (pass-through) stage: the previous stage's weights", path)
        rec = cls(rec_lm, item_scids, items, user_scids, prompt, stage=stage or path.name, **kwargs)
        rec.checkpoint_dir = path
        return rec

    # ---- requests ----

    def check(self, request: Request, where: str = "request") -> None:
        """Raise RequestError if the recommender cannot answer ``request``."""
        if not request.history:
            raise RequestError(f"{where}: 'history' is empty; the recommender needs at least one item the user interacted with")
        unknown = list(dict.fromkeys(i for i in request.history if i not in self.item_tokens))
        if unknown:
            shown = "[" + ", ".join(quote(i) for i in unknown[:5]) + (f", ... {len(unknown)} in all" if len(unknown) > 5 else "") + "]"
            raise RequestError(f"{where}: unknown item id(s) {shown} in 'history' (not in the catalogue of {self.n_items} items)")
        if not 1 <= request.k <= self.n_items:
            raise RequestError(f"{where}: 'k' = {request.k} is outside 1..{self.n_items} (the catalogue holds {self.n_items} items)")
        if request.user_id is not None and self.unknown_user == "error" and request.user_id not in self.user_tokens:
            raise RequestError(f"{where}: unknown user_id {quote(request.user_id)} (not in user_scids); omit it for an anonymous user")

    def prompt_for(self, request: Request) -> str:
        """The SEQ prompt of a request, as sft_data builds seq_eval_prompts."""
        history = [self.item_tokens[i] for i in request.history[-self.prompt.max_history :]]
        user = self.user_tokens.get(request.user_id) if (self.prompt.inject_user_scid and request.user_id is not None) else None
        return seq_prompt(history, user, self.prompt.template_id)

    def recommend_many(
        self, requests: Sequence[Request | Mapping[str, Any]], names: Sequence[str] | None = None
    ) -> list[list[dict[str, Any]]]:
        """One ranked list per request: dicts with rank (1-based), item_id, title, score (the summed log-
        probability of the item's SCID tokens; with the `align3gr_cf` ranker its hybrid score, SASRec's
        log-softmax at cf_weight = inf). All requests are checked (`parse_requests`, this
        recommender's `limits`) before any is decoded; an error names the request by ``names[n]``
        (default "request n")."""
        return self._decode(parse_requests(requests, self.limits, names), names)

    def _decode(self, parsed: list[Request], names: Sequence[str] | None = None) -> list[list[dict[str, Any]]]:
        where = list(names) if names is not None else [f"request {n}" for n in range(len(parsed))]
        for n, r in enumerate(parsed):
            self.check(r, where[n])
        out: list[list[dict[str, Any]]] = [[] for _ in parsed]
        # The decoder widens the beam to k when k > beam_width, which changes every list in its batch: requests
        # are decoded in groups of equal effective width, so a list never depends on the other requests.
        groups: dict[int, list[int]] = {}
        for n, r in enumerate(parsed):
            groups.setdefault(max(self.beam_width, r.k), []).append(n)
        for width, members in sorted(groups.items()):
            prompts = [self.prompt_for(parsed[n]) for n in members]
            top = max(parsed[n].k for n in members)
            if self.ranker == HYBRID:
                # The whole beam is the LM's candidate list (as evaluation's LM rows keep top_k = beam width).
                beam, _ = self._search(prompts, width, width)
                cands = score_candidates(self.rec_lm, self.sasrec, self.catalog, prompts, [parsed[n].history for n in members],
                                         beam.numpy(), cf_candidates=self.cf_candidates, batch_size=self.batch_size)
                idx_np, score_np = rank_candidates(cands, self.cf_weight, top)
                idx, score = torch.as_tensor(idx_np), torch.as_tensor(score_np)
            else:
                idx, score = self._search(prompts, width, top)
            for row, n in enumerate(members):
                k = parsed[n].k
                picked = idx[row, :k].tolist()
                if min(picked) < 0:  # the catalogue holds >= k items, so a correct decoder always fills k slots
                    raise RuntimeError(f"recommender: constrained decoding returned fewer than {k} items for request {n}")
                out[n] = [
                    {"rank": r + 1, "item_id": self.catalog.item_ids[i], "title": self.titles.get(self.catalog.item_ids[i], ""),
                     "score": float(s)}
                    for r, (i, s) in enumerate(zip(picked, score[row, :k].tolist()))
                ]
        return out

    def _search(self, prompts: list[str], width: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_prompts_sharded(self.rec_lm, prompts, self.catalog, nproc=self.decoding_nproc, timeout_s=self.decoding_timeout_s,
                                      where="inference.decoding", beam_width=width, top_k=top, batch_size=self.batch_size)

    def recommend(self, history: Sequence[str | int], user_id: str | None = None, k: int = 10) -> list[dict[str, Any]]:
        """Top-``k`` catalogue items for one user's history (a list of item ids, oldest first)."""
        # Passed as given, not list(history): a string must be refused, not split into characters.
        return self.recommend_many([{"history": history, "user_id": user_id, "k": k}], names=["recommend()"])[0]

    def recommend_frame(self, requests: pd.DataFrame, default_k: int) -> pd.DataFrame:
        """A requests table (history, optional user_id, k, request_id) -> one row per recommended item."""
        if "history" not in requests.columns:
            raise RequestError(f"requests table: no 'history' column (columns: {list(requests.columns)}); expected history, user_id (optional), k (optional)")
        ids = requests["request_id"].astype(str).tolist() if "request_id" in requests.columns else [str(n) for n in range(len(requests))]
        if len(set(ids)) != len(ids):
            raise RequestError("requests table: 'request_id' has duplicates")
        raw = []
        for n, row in enumerate(requests.to_dict("records")):
            k = row.get("k", default_k)
            raw.append({"history": _plain_list(row["history"]), "user_id": _null_to_none(row.get("user_id")),
                        "k": default_k if _null_to_none(k) is None else _plain_int(k)})
        names = [f"request {quote(rid)} (row {n})" for n, rid in enumerate(ids)]
        # An offline table may hold any number of requests (they are decoded in batches): no per-call bound.
        parsed = parse_requests(raw, RequestLimits(None, self.limits.max_history_items), names, what="requests table")
        lists = self._decode(parsed, names)
        rows = [{"request_id": rid, "user_id": req.user_id, **item, "model": self.label} for rid, req, lst in zip(ids, parsed, lists) for item in lst]
        frame = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
        return frame.astype({"request_id": "str", "rank": "int64", "item_id": "str", "title": "str", "score": "float64", "model": "str"})

    def settings(self) -> dict[str, Any]:
        out = {"prompt": asdict(self.prompt), "beam_width": self.beam_width, "batch_size": self.batch_size,
               "unknown_user": self.unknown_user, "stage": self.stage, "limits": asdict(self.limits)}
        if self.ranker != "lm":  # an LM-only recommender's settings stay as they were before the hybrid
            out.update(ranker=self.ranker, cf_weight=weight_label(self.cf_weight), cf_candidates=self.cf_candidates)
        return out


def build_recommender(
    item_scids: pd.DataFrame, items: pd.DataFrame | None, user_scids: pd.DataFrame | None,
    sft_data_params: Mapping[str, Any], params: Mapping[str, Any], sasrec: Any | None = None,
) -> Recommender:
    """The recommender the `inference` parameters describe: the checkpoint they name (or the newest stage
    under `models_dir`), prompts shaped by the `sft_data` parameters (as `seq_eval_prompts` is), ranked by
    `inference.ranker` (``align3gr_cf`` needs ``sasrec``, the tokenization stage's model)."""
    ranker = str(params.get("ranker", "lm"))
    if ranker not in RANKERS:
        raise ValueError(f"inference.ranker must be one of {list(RANKERS)}, got {ranker!r}")
    if ranker == HYBRID and sasrec is None:
        raise ValueError(f"inference.ranker is {HYBRID!r} but there is no sasrec_model checkpoint (06_models/sasrec); "
                         "run the tokenization stage, or set inference.ranker: lm")
    stage, path = resolve_checkpoint(params["models_dir"], params.get("checkpoint"))
    log.info("recommender: checkpoint %s (%s), ranker %s", path, stage, ranker)
    hybrid = {} if ranker == "lm" else {
        "ranker": ranker, "sasrec": sasrec, "cf_weight": check_weight(params.get("cf_weight", 1.0), "inference.cf_weight"),
        "cf_candidates": params.get("cf_candidates")}
    dec = dict(params.get("decoding") or {})
    sharded = {} if dec.get("nproc_per_node", 1) == 1 else {
        "decoding_nproc": dec["nproc_per_node"], "decoding_timeout_s": dec.get("launch_timeout_s")}
    return Recommender.from_checkpoint(
        path, item_scids, items, user_scids, PromptSettings.from_sft_data(sft_data_params), device=params.get("device", "auto"),
        dtype=str(params.get("dtype", "checkpoint")),
        stage=stage, beam_width=int(params["beam_width"]), batch_size=int(params["batch_size"]),
        unknown_user=str(params.get("unknown_user", "anonymous")), limits=limits_from_params(params), **hybrid, **sharded,
    )


def limits_from_params(params: Mapping[str, Any]) -> RequestLimits:
    """`inference.max_requests` / `inference.max_history_items`, defaults where absent."""
    default = RequestLimits()
    max_requests = params.get("max_requests", default.max_requests)
    return RequestLimits(None if max_requests is None else int(max_requests), int(params.get("max_history_items", default.max_history_items)))


def _null_to_none(value: Any) -> Any:
    if value is None:
        return None
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):  # arrays and lists: not a missing scalar
        return value


def _plain_list(value: Any) -> Any:
    """Parquet list cells come back as numpy arrays; the request parser wants plain lists."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _plain_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value.item() if hasattr(value, "item") else value


def write_settings(recommender: Recommender, path: str | Path) -> None:
    Path(path).write_text(json.dumps(recommender.settings(), indent=2))


def read_settings(path: str | Path) -> dict[str, Any]:
    raw = json.loads(Path(path).read_text())
    # A model logged before request limits existed gets the defaults.
    limits = RequestLimits(**raw["limits"]) if "limits" in raw else RequestLimits()
    # A model logged before the hybrid ranker existed (or an LM-only one) ranks by the LM.
    hybrid = {"ranker": str(raw.get("ranker", "lm")), "cf_weight": float(raw.get("cf_weight", 1.0)),
              "cf_candidates": raw.get("cf_candidates")}
    return {"prompt": PromptSettings(**raw["prompt"]), "beam_width": int(raw["beam_width"]), "batch_size": int(raw["batch_size"]),
            "unknown_user": str(raw["unknown_user"]), "stage": str(raw["stage"]), "limits": limits, **hybrid}
