"""`data_prep.source` → the loader that reads it."""
from __future__ import annotations

from .canonical import CONFLICT_RULES, RawTables, timestamp_settings
from .errors import DataPrepError
from .textio import DECODE_POLICIES, TextDecoding, check_encoding

SOURCES = ("demo", "movielens", "lcrec_json", "amazon2018")


def _section(params: dict, name: str) -> dict:
    section = params.get(name)
    if not isinstance(section, dict):
        raise DataPrepError(f"parameter data_prep.{name} must be a mapping of the {name} loader's options, got {section!r}")
    return section


def _encoding(section: dict, name: str, default: str) -> str | None:
    """The source's ``encoding``; ``auto`` (MovieLens) leaves each file its release encoding."""
    value = section.get("encoding", default)
    return None if value == "auto" else check_encoding(value, f"data_prep.{name}.encoding")


def _decoding(params: dict, section: dict, name: str, default: str) -> TextDecoding:
    return TextDecoding(encoding=_encoding(section, name, default), on_error=str(params.get("on_decode_error", "raise")),
                        parameter=f"data_prep.{name}.encoding")


def load_source(params: dict, seed: int) -> RawTables:
    source = params.get("source")
    policy = str(params.get("malformed_lines", "skip"))
    if source == "demo":
        from .demo_generator import generate_demo

        p = _section(params, "demo")
        return generate_demo(
            n_users=int(p.get("n_users", 1000)),
            n_items=int(p.get("n_items", 500)),
            mean_interactions=float(p.get("mean_interactions", 18)),
            seed=int(seed),
        )
    if source == "movielens":
        from .movielens import load_movielens

        p = _section(params, "movielens")
        return load_movielens(p.get("path"), malformed=policy, text=_decoding(params, p, "movielens", "auto"))
    if source == "lcrec_json":
        from .lcrec_json import load_lcrec_json

        p = _section(params, "lcrec_json")
        return load_lcrec_json(p.get("path"), name=p.get("name"), malformed=policy,
                               text=_decoding(params, p, "lcrec_json", "utf-8"))
    if source == "amazon2018":
        from .amazon2018 import load_amazon2018

        p = _section(params, "amazon2018")
        raw = load_amazon2018(
            ratings_path=p.get("ratings_path"),
            meta_path=p.get("meta_path"),
            reviews_path=p.get("reviews_path"),
            malformed=policy,
            text=_decoding(params, p, "amazon2018", "utf-8"),
        )
        raw.report["k_core"] = int(p.get("k_core", 5))  # the standard Amazon preprocessing
        return raw
    raise DataPrepError(f"parameter data_prep.source must be one of {list(SOURCES)}, got {source!r}")


def check_params(params: dict) -> None:
    """Reject bad settings before anything is read or written (a failed run must not half-overwrite outputs)."""
    if not isinstance(params, dict):
        raise DataPrepError(f"parameters data_prep must be a mapping, got {type(params).__name__}")
    if params.get("source") not in SOURCES:
        raise DataPrepError(f"parameter data_prep.source must be one of {list(SOURCES)}, got {params.get('source')!r}")
    if str(params.get("malformed_lines", "skip")) not in ("skip", "fail"):
        raise DataPrepError(
            f"parameter data_prep.malformed_lines must be 'skip' or 'fail', got {params.get('malformed_lines')!r}"
        )
    if params.get("on_decode_error", "raise") not in DECODE_POLICIES:
        raise DataPrepError(
            f"parameter data_prep.on_decode_error must be one of {list(DECODE_POLICIES)}, "
            f"got {params.get('on_decode_error')!r}"
        )
    source = params["source"]
    if source != "demo":
        _encoding(_section(params, source), source, "auto" if source == "movielens" else "utf-8")
    timestamp_settings(params)
    if params.get("conflicting_duplicates", "first") not in CONFLICT_RULES:
        raise DataPrepError(
            f"parameter data_prep.conflicting_duplicates must be one of {list(CONFLICT_RULES)}, "
            f"got {params.get('conflicting_duplicates')!r}"
        )

    def integer(name: str, value: object, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DataPrepError(f"parameter data_prep.{name} must be an integer >= {minimum}, got {value!r}")

    integer("max_history", params.get("max_history", 20), 1)
    integer("min_interactions", params.get("min_interactions", 3), 3)
    integer("k_core", params.get("k_core", 0) or 0, 0)
    rr = params.get("rating_range", [0.5, 5.0])
    if not (isinstance(rr, (list, tuple)) and len(rr) == 2 and all(isinstance(x, (int, float)) for x in rr) and rr[0] < rr[1]):
        raise DataPrepError(f"parameter data_prep.rating_range must be [low, high] with low < high, got {rr!r}")
    fb = params.get("feedback", {}) or {}
    lo, hi = fb.get("disliked_max", 1), fb.get("liked_min", 4)
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi):
        raise DataPrepError(
            f"parameters data_prep.feedback.disliked_max < liked_min expected, got disliked_max={lo!r}, liked_min={hi!r}"
        )
    if fb.get("half_star", "up") not in ("up", "down"):
        raise DataPrepError(f"parameter data_prep.feedback.half_star must be 'up' or 'down', got {fb.get('half_star')!r}")
