"""The quality study's rows on one machine without Kedro or MLflow (e.g. a borrowed GPU box), as a JSON report.

    python benchmarks/gpu_study.py --env ml_latest_small_gpu --rows full,tiger --deadline 540 --out gpu_report.json
    python benchmarks/gpu_study.py --env ml_latest_small_gpu --data-root data/ml_latest_small \\
        --cached-stages data_prep,tokenization --rows full       # reuse a CPU run's first two stages
    python benchmarks/gpu_study.py --env base --rows full --tiny --out /tmp/r.json   # CPU, seconds to minutes
    python benchmarks/gpu_study.py --env instruments_cpu --seed 43 --rows sft_cf,tca_all_a01 \
        --cached-stages data_prep,tokenization --data-root carry/s43 --set evaluation.max_users.valid=2000 \
        --results-dir study_gpu     # + results/<row>/seed43/{metrics,per_case}.parquet for study_pooled.py

What it runs. Each row of benchmarks/study_rows.py is a set of parameter overrides and a list of stages;
the stages' nodes are the project's own (each stage's ``create_pipeline()``), run in DAG order by calling
the node functions on in-memory values, exactly the inputs and outputs Kedro would wire. Only torch,
transformers, peft, pandas, pyarrow, pyyaml and sentence-transformers are needed: when Kedro is not
installed, a stand-in for ``kedro.pipeline`` (Node, Pipeline, node) records the wiring. Parameters are
conf/base + conf/<env> merged key by key, as the project's config loader does (``${globals:...}`` and
``${oc.env:VAR,default}`` are resolved). A stage shared by two rows with the same resolved parameters runs once.

``--cached-stages`` takes those stages' outputs from a Kedro data root (``--data-root``) written by an
earlier ``kedro run --env <env>`` (e.g. data_prep and tokenization on a CPU), read through the catalog's
file paths; only the outputs that the row's later stages read are loaded, so the root need hold no more. The
report (``--out``) is rewritten atomically after every stage: per stage its wall seconds,
the device, peak GPU memory and the scalar metrics the stage returned; per row the evaluation metrics.
Stages that would start after ``--deadline`` seconds are recorded as skipped, so a time-boxed machine
still returns a report (``--deadline-scope row``: rows, so that a started row is never left without its
evaluation). SFT checkpoints go to ``--work-dir`` (default a new temporary folder), never to the catalog's
shared folder, so that studies side by side never read each other's checkpoints.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

from quality_study import parse_set  # noqa: E402
from study_pooled import PER_CASE_FILE, per_case_table, write_parquet_atomic  # noqa: E402
from study_rows import QUICK_OVERRIDES, RUNS, STAGES, overrides_in_env  # noqa: E402

# The base env's demo is ~500 items; these sizes make every stage run in seconds on a CPU (the test's setting).
TINY_OVERRIDES: dict[str, Any] = {
    **{k: v for k, v in QUICK_OVERRIDES.items() if not k.startswith("data_prep.")},
    "data_prep.demo.n_users": 60,
    "data_prep.demo.n_items": 50,
    "sft_train.trainer.max_steps": 2,
    "sft_train.trainer.eval_steps": 1,
    "sp_dpo_curriculum.prompts_per_stage": 4,
    "rf_dpo.prompts.max_users": 6,
    "evaluation.max_users.valid": 10,
}


# --- Kedro's pipeline wiring, with or without Kedro -------------------------------------------------------------
def _install_pipeline_stand_in() -> None:
    """A minimal ``kedro.pipeline`` (Node, node, Pipeline) so the project's pipeline.py files import without Kedro."""

    class Node:
        def __init__(self, func, inputs=None, outputs=None, *, name=None, **_: Any):
            as_list = lambda v: [] if v is None else [v] if isinstance(v, str) else list(v)  # noqa: E731
            self.func, self.inputs, self.outputs = func, as_list(inputs), as_list(outputs)
            self.name = name or getattr(func, "__name__", "node")

    class Pipeline:
        def __init__(self, nodes=(), **_: Any):
            self._nodes = [n for item in nodes for n in (item._nodes if isinstance(item, Pipeline) else [item])]

        def __add__(self, other: "Pipeline") -> "Pipeline":
            return Pipeline([*self._nodes, *other._nodes])

        @property
        def nodes(self) -> list[Node]:
            return _toposort(self._nodes)

    kedro = types.ModuleType("kedro")
    pipeline = types.ModuleType("kedro.pipeline")
    pipeline.Node, pipeline.node, pipeline.Pipeline = Node, Node, Pipeline
    kedro.pipeline = pipeline
    sys.modules["kedro"], sys.modules["kedro.pipeline"] = kedro, pipeline


def _toposort(nodes: list[Any]) -> list[Any]:
    produced = {o: n for n in nodes for o in n.outputs}
    done: list[Any] = []
    seen: set[int] = set()

    def visit(n: Any, path: tuple[str, ...] = ()) -> None:
        if id(n) in seen:
            return
        if n.name in path:
            raise ValueError(f"pipeline cycle through node {n.name!r}")
        for i in n.inputs:
            if i in produced and produced[i] is not n:
                visit(produced[i], (*path, n.name))
        seen.add(id(n))
        done.append(n)

    for n in sorted(nodes, key=lambda n: n.name):
        visit(n)
    return done


def stage_nodes(stage: str) -> list[Any]:
    try:
        importlib.import_module("kedro.pipeline")
    except ImportError:
        _install_pipeline_stand_in()
    return list(importlib.import_module(f"align3gr_pipelines.pipelines.{stage}").create_pipeline().nodes)


# --- parameters and catalog ------------------------------------------------------------------------------------
def _read_yaml_dir(folder: Path, prefix: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for path in sorted(folder.glob(f"{prefix}*.yml")):
        out = _merge(out, yaml.safe_load(path.read_text()) or {})
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _resolve(value: Any, globals_: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, globals_) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, globals_) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        if kind == "globals":
            return str(globals_[arg])
        var, _, default = arg.partition(",")
        return os.environ.get(var.strip(), default.strip())

    return re.sub(r"\$\{(globals|oc\.env):([^}]*)\}", sub, value)


def load_conf(env: str, conf: Path = REPO / "conf") -> tuple[dict[str, Any], dict[str, Any], str]:
    """(parameters, catalog, data_root) of conf/base overlaid key by key with conf/<env> (the project's soft merge)."""
    envs = [conf / "base"] + ([conf / env] if env != "base" else [])
    for folder in envs:
        if not folder.is_dir():
            raise FileNotFoundError(f"--env {env}: no folder {folder}")
    globals_: dict[str, Any] = {}
    params: dict[str, Any] = {}
    catalog: dict[str, Any] = {}
    for folder in envs:
        globals_ = _merge(globals_, _read_yaml_dir(folder, "globals"))
        params = _merge(params, _read_yaml_dir(folder, "parameters"))
        catalog = _merge(catalog, _read_yaml_dir(folder, "catalog"))
    return _resolve(params, globals_), _resolve(catalog, globals_), str(globals_.get("data_root", "data"))


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        node, parts = out, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"override {key!r}: no parameter group {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise KeyError(f"override {key!r}: no parameter {parts[-1]!r}")
        node[parts[-1]] = value
    return out


def catalog_entry(catalog: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A dataset's catalog entry, exact or from a factory pattern like "sp_dpo_model_{stage}" (placeholders
    filled in, as Kedro's dataset factories do)."""
    if name in catalog:
        return catalog[name]
    for pattern, entry in catalog.items():
        if "{" not in pattern:
            continue
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+)", re.escape(pattern))
        m = re.fullmatch(regex, name)
        if m:
            fill = lambda v: v.format(**m.groupdict()) if isinstance(v, str) else v  # noqa: E731
            return {k: fill(v) for k, v in entry.items()}
    return None


def _param(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def load_cached(name: str, entry: dict[str, Any], data_root: str, default_root: str) -> Any:
    """One catalog entry's value from a Kedro data root (the kinds of file the project's catalog uses)."""
    def path(key: str) -> Path:
        p = str(entry[key])
        return Path(data_root) / os.path.relpath(p, default_root) if p.startswith(default_root) else Path(p)

    kind = str(entry.get("type", ""))
    if kind.endswith("CheckpointDataset"):
        folder = path("path")
        if not (folder / "_CHECKPOINT_COMPLETE.json").is_file():
            if entry.get("optional"):
                return None
            raise FileNotFoundError(f"{name}: no finished checkpoint under {folder}")
        module, cls = entry["load_class"].rsplit(".", 1)
        return getattr(importlib.import_module(module), cls).from_pretrained(str(folder), **entry.get("load_args", {}))
    if kind.endswith("ParquetDataset"):
        import pandas as pd

        return pd.read_parquet(path("filepath"))
    if kind.endswith("JSONDataset"):
        return json.loads(path("filepath").read_text())
    if kind.endswith("TextDataset"):
        return path("filepath").read_text()
    raise ValueError(f"{name}: cannot read a cached {kind or 'untyped'} dataset (only Parquet, JSON, text, checkpoints)")


# --- running ----------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if isinstance(v, (int, float, str, bool, dict)) or v is None}
    if isinstance(value, float) and value != value:
        return None
    return value


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Study:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.torch = args, torch
        self.t0 = time.perf_counter()
        self.params, self.catalog, self.default_root = load_conf(args.env)
        self.memo: dict[str, dict[str, Any]] = {}  # stage key -> outputs
        self.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_study_")
        cuda = torch.cuda.is_available()
        self.report: dict[str, Any] = {
            "env": args.env, "rows": {}, "seed": args.seed, "deadline_s": args.deadline, "tiny": args.tiny,
            "cached_stages": args.cached_stages, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=1, default=str))
        os.replace(tmp, out)

    def row_params(self, row: str) -> dict[str, Any]:
        overrides = {**(TINY_OVERRIDES if self.args.tiny else {}), **self.args.set, **overrides_in_env(RUNS[row], self.args.env)}
        params = apply_overrides(self.params, overrides)
        params["seed"] = self.args.seed
        return params

    def stage_params(self, stage: str, params: dict[str, Any], key: str) -> dict[str, Any]:
        """The row's parameters for one stage run. SFT writes its checkpoints to a folder of this run and this
        stage key (its settings and everything upstream): the catalog's default is one folder for every process
        in the repository, so two studies at once (seeds side by side on one GPU) would load each other's best
        checkpoints, and two rows of one study could resume from each other's."""
        if stage != "sft_train":
            return params
        out = copy.deepcopy(params)
        out["sft_train"]["trainer"]["output_dir"] = str(Path(self.work_dir) / f"sft_{key}")
        return out

    def run_row(self, row: str) -> None:
        params = self.row_params(row)
        entry = self.report["rows"].setdefault(row, {"about": RUNS[row].about, "stages": {}})
        values: dict[str, Any] = {}
        key = ""
        for stage in RUNS[row].stages:
            key = _digest([key, stage, params.get(stage), params["seed"]])
            if stage in self.args.cached_stages:
                values.update(self._load_stage(stage, self._read_later(row, stage)))
                entry["stages"][stage] = {"cached_from": self.args.data_root}
                continue
            if key in self.memo:
                values.update(self.memo[key])
                entry["stages"][stage] = {"reused_from_row": self.memo[key]["__row__"]}
                continue
            started = any("seconds" in info for info in entry["stages"].values())
            if self.elapsed() > self.args.deadline and not (self.args.deadline_scope == "row" and started):
                entry["stages"][stage] = {"skipped": f"deadline ({self.args.deadline:.0f} s) passed"}
                self.save()
                continue
            outputs, info = self._run_stage(stage, self.stage_params(stage, params, key), values)
            self.memo[key] = {**outputs, "__row__": row}
            values.update(outputs)
            entry["stages"][stage] = info
            self.save()
        if "evaluation_metrics" in values:
            table = values["evaluation_metrics"]
            entry["metrics"] = [
                {k: _jsonable(v) for k, v in rec.items()} for rec in table.to_dict("records")
                if rec.get("metric") in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
            ]
            if self.args.results_dir:
                entry["results"] = str(self._write_results(row, values))
        self.save()

    def _write_results(self, row: str, values: dict[str, Any]) -> Path:
        """The row's evaluation as a quality-study job leaves it (results/<row>/seed<N>/: metrics.parquet,
        per_case.parquet), so benchmarks/study_pooled.py and quality_study's report read it."""
        folder = Path(self.args.results_dir) / "results" / row / f"seed{self.args.seed}"
        folder.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(per_case_table(values["recommendations"], values["test"]), folder / PER_CASE_FILE)
        write_parquet_atomic(values["evaluation_metrics"], folder / "metrics.parquet")  # last: marks the job done
        return folder

    def _read_later(self, row: str, stage: str) -> set[str]:
        """The datasets that the row's stages after `stage` read: all a cached stage needs to provide (so a data
        root can travel without, e.g., tokenization's embeddings, which only tokenization itself reads)."""
        later = RUNS[row].stages[RUNS[row].stages.index(stage) + 1:]
        return {i for st in later for n in stage_nodes(st) for i in n.inputs}

    def _load_stage(self, stage: str, needed: set[str]) -> dict[str, Any]:
        if not self.args.data_root:
            raise SystemExit("--cached-stages needs --data-root (a Kedro data root, e.g. data/ml_latest_small)")
        outputs = {o for n in stage_nodes(stage) for o in n.outputs} & needed
        entries = {o: catalog_entry(self.catalog, o) for o in sorted(outputs)}
        return {o: load_cached(o, e, self.args.data_root, self.default_root)
                for o, e in entries.items() if e is not None and not e.get("type", "").endswith("MatplotlibDataset")}

    def _run_stage(self, stage: str, params: dict[str, Any], values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        torch = self.torch
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        outputs: dict[str, Any] = {}
        scalars: dict[str, Any] = {}
        node_s: dict[str, float] = {}
        for n in stage_nodes(stage):
            args = []
            for name in n.inputs:
                if name.startswith("params:"):
                    args.append(copy.deepcopy(_param(params, name[len("params:"):])))
                elif name in outputs or name in values:
                    value = outputs[name] if name in outputs else values[name]
                    # Kedro hands each node a fresh copy (a reloaded checkpoint or a MemoryDataset copy); a DPO
                    # stage must not train the object evaluation reads as the SFT model.
                    args.append(value.copy() if hasattr(value, "to_parquet") else copy.deepcopy(value))
                elif (catalog_entry(self.catalog, name) or {}).get("optional"):
                    args.append(None)
                else:
                    raise KeyError(f"stage {stage}, node {n.name}: input {name!r} is neither computed nor cached")
            t = time.perf_counter()
            result = n.func(*args)
            node_s[n.name] = round(time.perf_counter() - t, 2)
            results = [result] if len(n.outputs) == 1 else list(result) if n.outputs else []
            for name, value in zip(n.outputs, results):
                outputs[name] = value
                if isinstance(value, dict) and isinstance(value.get("scalars"), dict):
                    scalars[name] = _jsonable(value["scalars"])
                elif name.startswith("eval_info_") and isinstance(value, dict):
                    scalars[name] = _jsonable(value)  # e.g. the weight align3gr_cf chose on valid
        info = {
            "seconds": round(time.perf_counter() - started, 2),
            "node_seconds": node_s,
            "scalars": scalars,
        }
        if torch.cuda.is_available():
            info["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"[{self.elapsed():7.1f} s] {stage}: {info['seconds']} s", flush=True)
        return outputs, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="ml_latest_small_gpu", help="conf env overlaid on conf/base ('base' = the demo)")
    ap.add_argument("--rows", default="full", help=f"comma-separated study rows, of: {', '.join(RUNS)}")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds after which no new stage starts")
    ap.add_argument("--deadline-scope", choices=("stage", "row"), default="stage",
                    help="stage: no stage starts after the deadline; row: no row starts, a started row runs to its end")
    ap.add_argument("--work-dir", default=None,
                    help="where SFT writes its checkpoints (default: a new temporary folder of this run)")
    ap.add_argument("--out", default="gpu_study_report.json")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (study_rows' quick overrides on the demo)")
    ap.add_argument("--cached-stages", default="", help="stages read from --data-root instead of run, e.g. data_prep,tokenization")
    ap.add_argument("--data-root", default=None, help="a Kedro data root holding the cached stages' outputs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter override for every row (repeatable; the row's own overrides win)")
    ap.add_argument("--results-dir", default=None,
                    help="also write each evaluated row as a quality-study result (DIR/results/<row>/seed<N>/)")
    args = ap.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    args.cached_stages = [s for s in args.cached_stages.split(",") if s]
    try:
        args.set = parse_set(args.set)
    except ValueError as err:
        ap.error(str(err))
    unknown = [r for r in args.rows if r not in RUNS] + [s for s in args.cached_stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown rows or stages: {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The stages' own progress lines (valid recall per SFT evaluation, the hybrid's chosen weight) are INFO logs;
    # Kedro would show them, a bare interpreter would not.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("align3gr_pipelines").setLevel(logging.INFO)
    study = Study(args)
    study.save()
    for row in args.rows:
        study.run_row(row)
    # What a machine without Kedro or MLflow needs to know: this run never imported them.
    # (The kedro.pipeline stand-in has no __file__; a real Kedro has.)
    study.report["imported"] = {m: getattr(sys.modules.get(m), "__file__", None) is not None for m in ("kedro", "mlflow")}
    study.save()
    print(f"report: {args.out} ({study.elapsed():.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
