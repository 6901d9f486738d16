"""Parameters checked against conf/base before anything runs: an unknown key or a wrong type stops the run.

``conf/base/parameters*.yml`` is the contract. Every key an env or ``--params`` may set exists there, and
its base value says what it takes. `build_schema` turns the base parameters into pydantic models built on
the fly (unknown keys forbidden), so a key added to a base file is accepted in every env at once and this
module needs no edit. Where the base value alone cannot say what is allowed, `RULES` says it: open maps,
documented alternative types, and keys the code reads with a default that base does not list yet.

Types from the base value: a bool takes only true/false; an int only an integer; a float an integer or a
float; a string only a string; a list a list (of the base elements' type when they share one); a mapping
the base's keys; null anything.

Kedro-free: plain dicts in, `ParamIssue`s out. The hook (`param_validation_hook.py`) reads the active env's
merged parameters and conf/base and feeds them here.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, create_model

SKIP_ENV = "ALIGN3GR_SKIP_PARAM_CHECK"


@dataclass(frozen=True)
class Rule:
    """What a parameter takes beyond what its base value says.

    ``open``: a mapping whose keys the user names; keys beyond the base's are accepted with any value (the
    base's own keys keep their types). ``also``: further types accepted (``None`` for null, ``bool``,
    ``int``, ``float``, ``str``, ``list``, ``dict``). On a path base lacks, ``also`` declares that key.
    """

    why: str
    open: bool = False
    also: tuple[Any, ...] = ()


_NULL_MEANS = "the base comment documents null"
# The one list of exceptions. Each entry says why the base value alone is not the whole contract; keep it
# short: a new key needs nothing here unless base cannot show what it takes.
RULES: dict[str, Rule] = {
    # Open maps: keys the user names.
    "rf_dpo.sentiment.label_to_level": Rule("keys are the chosen HF classifier's own labels", open=True),
    # Documented alternatives: the base comment (or the code reading the value) takes another type too.
    "data_prep.timestamps.min": Rule("a quoted date, unix seconds, or null = no bound (data.canonical)", also=(int, None)),
    "data_prep.timestamps.max": Rule("a quoted date, unix seconds, or null = no bound (data.canonical)", also=(int, None)),
    "inference.max_requests": Rule(f"{_NULL_MEANS}: no bound on requests per call", also=(None,)),
    "evaluation.max_users": Rule("cases.eval_cases also takes one number or null for every split", also=(int, None)),
    "evaluation.max_users.valid": Rule(f"{_NULL_MEANS}: every valid user", also=(None,)),
    "evaluation.torch_threads": Rule(f"{_NULL_MEANS}: torch's default", also=(None,)),
    "rf_dpo.prompts.max_users": Rule(f"{_NULL_MEANS}: every user", also=(None,)),
    "rf_dpo.prompts.max_history": Rule(f"{_NULL_MEANS}: the whole training prefix", also=(None,)),
    "rf_dpo.prompts.user_scid_in_prompt": Rule("auto, or true/false to force it (self_play.user_tokens_like_sft)",
                                               also=(bool,)),
    "rf_dpo.selection.n_users": Rule("null = every valid user (the ml_latest_small env sets it)", also=(None,)),
    "rf_dpo.selection.max_p_value": Rule("as sp_dpo_curriculum.selection.max_p_value", also=(None,)),
    "sft_data.max_train_examples": Rule(f"{_NULL_MEANS}: every example of every task", also=(None,)),
    "sft_train.trainer.torch_threads": Rule(f"{_NULL_MEANS} (torch's default); an int forces it", also=(int, None)),
    "sft_train.trainer.bf16": Rule("auto, or true/false to force it (hf_trainer._bf16)", also=(bool,)),
    "sft_train.trainer.history_loss_tasks": Rule(f"{_NULL_MEANS}: every task's prompt", also=(None,)),
    "sft_train.trainer.early_stopping.patience": Rule(f"{_NULL_MEANS}: never stop early", also=(None,)),
    "sft_train.trainer.model_selection.n_users": Rule("null = every valid user (sft.trainer)", also=(None,)),
    "sp_dpo_curriculum.prompts.user_scid_in_prompt": Rule("auto, or true/false to force it", also=(bool,)),
    "sp_dpo_curriculum.selection.n_users": Rule("null = every valid user (the ml_latest_small env sets it)",
                                                also=(None,)),
    "sp_dpo_curriculum.selection.max_p_value": Rule(f"{_NULL_MEANS}: any higher valid recall", also=(None,)),
    "tokenization.num_threads": Rule(f"{_NULL_MEANS}: torch's default", also=(None,)),
    "tokenization.rq_vae.min_items_per_code": Rule(f"{_NULL_MEANS}: codebook_size everywhere", also=(None,)),
    # Keys the code reads with a default that base does not list yet (better: add them to base, drop them here).
    "evaluation.stage_report_k": Rule("evaluation's stage report reads it (default 10)", also=(int,)),
    "sft_train.trainer.adam_beta1": Rule("hf_trainer.training_arguments reads it (default 0.9)", also=(float,)),
    "sft_train.trainer.adam_beta2": Rule("hf_trainer.training_arguments reads it (default 0.999)", also=(float,)),
    "sft_train.trainer.dataloader_num_workers": Rule("hf_trainer.training_arguments reads it (default 0)",
                                                     also=(int,)),
}

_BOOL = Annotated[bool, Strict()]
_INT = Annotated[int, Strict()]  # strict: true is not 1
_FLOAT = Union[Annotated[float, Strict()], _INT]  # YAML and --params write 1 for 1.0
_STR = Annotated[str, Strict()]
_SCALARS: dict[Any, tuple[Any, str]] = {
    None: (type(None), "null"),
    bool: (_BOOL, "true or false"),
    int: (_INT, "an integer"),
    float: (_FLOAT, "a number"),
    str: (_STR, "a string"),
    list: (list, "a list"),
    dict: (dict, "a mapping"),
}
_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class ParamIssue:
    """One parameter that does not match conf/base."""

    path: str  # dotted, list items as [i]
    source: str  # the base file its top-level key comes from ("" when none does)
    unknown: bool  # an unknown key; else a value of the wrong type
    expected: str
    got: str = ""
    closest: str | None = None

    @property
    def stage(self) -> str:
        name = self.source.rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0]
        return stem[len("parameters_"):] if stem.startswith("parameters_") else ""

    def describe(self) -> str:
        if self.source:
            where = f"stage {self.stage}, {self.source}" if self.stage else self.source
        else:
            where = "in no conf/base/parameters*.yml"
        if self.unknown:
            hint = f"; closest valid key: {self.closest}" if self.closest else ""
            return f"{self.path} [{where}]: unknown key; expected {self.expected}{hint}"
        return f"{self.path} [{where}]: expected {self.expected}, got {self.got}"


class ParameterCheckError(ValueError):
    """The run's parameters do not match conf/base; the message lists every problem."""

    def __init__(self, issues: list[ParamIssue]) -> None:
        self.issues = issues
        super().__init__(format_issues(issues))


@dataclass(frozen=True)
class ParamSchema:
    """conf/base's parameters as a pydantic model, plus what the error messages need."""

    model: type[BaseModel]
    expected: Mapping[str, str]  # dotted path (list items as []) -> what it takes
    children: Mapping[str, tuple[str, ...]]  # dotted path of a mapping ("" = top) -> its keys
    sources: Mapping[str, str] = field(default_factory=dict)  # top-level key -> base file

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in self.expected if "[]" not in p)


def build_schema(base: Mapping[str, Any], sources: Mapping[str, str] | None = None,
                 rules: Mapping[str, Rule] = RULES) -> ParamSchema:
    """The schema of conf/base's parameters (`base`: conf/base alone, resolved); `sources` maps each
    top-level key to the base file that defines it, for the messages."""
    builder = _Builder(rules)
    model = builder.model("", base)
    return ParamSchema(model, builder.expected, builder.children, dict(sources or {}))


class _Builder:
    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.rules = rules
        self.expected: dict[str, str] = {}
        self.children: dict[str, tuple[str, ...]] = {}

    def model(self, path: str, mapping: Mapping[str, Any]) -> type[BaseModel]:
        items = {str(k): v for k, v in mapping.items()}
        declared = [p.rsplit(".", 1)[-1] for p in self.rules if _parent(p) == path]
        keys = [*items, *(k for k in declared if k not in items)]
        fields: dict[str, Any] = {}
        for i, key in enumerate(keys):
            child = _join(path, key)
            types, texts = self.field_types(child, items.get(key), key in items)
            self.expected[child] = " or ".join(texts)
            # Field names are positional: keys like `model`, `json` or `min-x` would clash with BaseModel.
            fields[f"f{i}"] = (Union[tuple(types)] if types else Any, Field(default=None, alias=key))
        self.children[path] = tuple(keys)
        is_open = path in self.rules and self.rules[path].open
        config = ConfigDict(extra="allow" if is_open else "forbid", strict=True)
        return create_model(_model_name(path), __config__=config, **fields)

    def field_types(self, path: str, value: Any, in_base: bool) -> tuple[list[Any], list[str]]:
        """The types a key takes (none: anything) and their descriptions: its base value's, plus its rule's."""
        types: list[Any] = []
        texts: list[str] = []
        if in_base:
            annotation, text = self.annotation(path, value)
            if annotation is Any:  # null in base: anything goes already
                return [], [text]
            types, texts = [annotation], [text]
        for extra in self.rules[path].also if path in self.rules else ():
            tp, text = _SCALARS[extra]
            if text not in texts:
                types.append(tp)
                texts.append(text)
        return types, texts or ["any value"]

    def annotation(self, path: str, value: Any) -> tuple[Any, str]:
        if value is None:
            return Any, "any value (null in conf/base)"
        if isinstance(value, Mapping):
            keys = ", ".join(map(str, value)) or "none"
            return self.model(path, value), f"a mapping (keys: {_shorten(keys, 80)})"
        if isinstance(value, list):
            element = _common_element(value)
            if element is _MIXED:
                return list, "a list"
            item, text = self.annotation(f"{path}[]", element)
            self.expected[f"{path}[]"] = text
            return list[item], f"a list of {_plural(text)}"
        for tp in (bool, int, float, str):  # bool first: True is an int too
            if isinstance(value, tp):
                return _SCALARS[tp]
        return Any, "any value"


_MIXED = object()


def _common_element(values: list[Any]) -> Any:
    """A representative of the list's elements when they share a type (ints and floats mixed: a float)."""
    if not values:
        return _MIXED
    kinds = {_kind(v) for v in values}
    if kinds == {"int", "float"}:
        return float(next(v for v in values if isinstance(v, float)))
    if len(kinds) != 1 or kinds == {"dict"}:  # dicts in a list differ per element: left free
        return _MIXED
    if kinds == {"list"}:
        inner = [_common_element(v) for v in values]
        if any(i is _MIXED for i in inner) or len({_kind(i) for i in inner}) != 1:
            return _MIXED
        return max(values, key=lambda v: isinstance(_common_element(v), float))
    return values[0]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    if isinstance(value, Mapping):
        return "dict"
    return "none" if value is None else "other"


def _plural(text: str) -> str:
    words = {"an integer": "integers", "a number": "numbers", "a string": "strings", "true or false": "booleans"}
    return words.get(text, text)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _model_name(path: str) -> str:
    return "Params_" + re.sub(r"\W", "_", path) if path else "Params"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def find_issues(params: Mapping[str, Any], schema: ParamSchema) -> list[ParamIssue]:
    """Every parameter of `params` (merged, or only overrides) that does not match the schema."""
    try:
        schema.model.model_validate(params)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    else:
        return []
    found: dict[str, ParamIssue] = {}
    for error in errors:
        path, value = _data_path(params, error["loc"])
        if not path or path in found:
            continue
        found[path] = _issue(path, value, error["type"] == "extra_forbidden", schema)
    # A value tried against a union (e.g. a mapping or a number) fails once per member; when one member got
    # further into the value, the error on the value as a whole says nothing more.
    issues = sorted(found.values(), key=lambda i: i.path)
    return [i for i in issues if i.unknown or not any(_is_inside(o.path, i.path) for o in issues)]


def _is_inside(path: str, ancestor: str) -> bool:
    return path != ancestor and (path.startswith(ancestor + ".") or path.startswith(ancestor + "["))


def _data_path(params: Mapping[str, Any], loc: Iterable[Any]) -> tuple[str, Any]:
    """Where in `params` a pydantic error location points (union member tags in it are skipped)."""
    path, node = "", params
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            path, node = _join(path, str(part)), node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
    return path, node


def _issue(path: str, value: Any, unknown: bool, schema: ParamSchema) -> ParamIssue:
    top = re.split(r"[.\[]", path, maxsplit=1)[0]
    source = schema.sources.get(top, "")
    if unknown:
        parent = _parent(path)
        shape = _INDEX.sub("[]", parent)
        if parent:
            expected = f"a key defined under {parent}" + (f" in {source}" if source else "")
        else:
            expected = "a top-level key of a conf/base/parameters*.yml file"
        closest = _closest(path, value, schema)
        if not closest and shape in schema.children:
            closest_text = ", ".join(schema.children[shape])
            expected += f" ({_shorten(closest_text, 160)})"
        if not parent and closest:
            where = schema.sources.get(closest.split(".", 1)[0])
            closest = f"{closest} ({where})" if where else closest
        return ParamIssue(path, source, True, expected, closest=closest)
    shape = _INDEX.sub("[]", path)
    expected = schema.expected.get(shape, "the type of its conf/base value")
    return ParamIssue(path, source, False, expected, got=f"{_shorten(repr(value), 60)} ({_type_name(value)})")


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)


def _closest(path: str, value: Any, schema: ParamSchema) -> str | None:
    """The valid key the unknown `path` most likely meant: a sibling spelled alike, else the valid dotted
    path closest to it (or to a leaf under it, for a mapping put in the wrong place)."""
    parent, key = _parent(path), path.rsplit(".", 1)[-1]
    siblings = schema.children.get(_INDEX.sub("[]", parent), ())
    match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if match:
        return _join(parent, match[0])
    paths = schema.paths
    tries = [path, *(_join(path, leaf) for leaf in _leaves(value))]
    best: tuple[float, str] | None = None
    for candidate in tries:
        for hit in difflib.get_close_matches(candidate, paths, n=1, cutoff=0.75):
            ratio = difflib.SequenceMatcher(None, candidate, hit).ratio()
            if best is None or ratio > best[0]:
                best = (ratio, hit)
    return best[1] if best else None


def _leaves(value: Any, prefix: str = "") -> list[str]:
    if not isinstance(value, Mapping):
        return [prefix] if prefix else []
    out: list[str] = []
    for key, inner in value.items():
        out += _leaves(inner, _join(prefix, str(key)))
    return out


def format_issues(issues: list[ParamIssue]) -> str:
    head = (f"{len(issues)} parameter problem{'s' if len(issues) != 1 else ''}: every key an env or --params "
            "sets must exist in conf/base/parameters*.yml, with a value of the base value's type")
    lines = [f"  - {issue.describe()}" for issue in issues]
    tail = (f"Fix the key or value (or add the key to conf/base first; docs/parameters.md). {SKIP_ENV}=1 "
            "skips this check.")
    return "\n".join([head, *lines, tail])


def check_params(params: Mapping[str, Any], schema: ParamSchema) -> None:
    """Raises `ParameterCheckError` naming every problem of `params`."""
    issues = find_issues(params, schema)
    if issues:
        raise ParameterCheckError(issues)


def nest_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` as ``{"a": {"b": 1}}``, the shape ``--params a.b=1`` gives Kedro."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r} sets a key under {part!r}, which another override sets "
                                 "to a value")
        node[leaf] = value
    return nested
