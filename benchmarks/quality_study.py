"""The paper's tables on a real dataset (default: ml-latest-small), every row a parameter override of the
same Kedro pipeline, >= 3 seeds, mean +- 95% CI, one Markdown + PNG results file.

    python benchmarks/quality_study.py                        # every run (benchmarks/study_rows.py), seeds 42-44
    python benchmarks/quality_study.py --jobs 3                # the three seeds at once, one thread each
    python benchmarks/quality_study.py --rows full,tiger --seeds 42
    python benchmarks/quality_study.py --quick                # tiny sizes, 1 seed, 3 runs: checks the machinery
    python benchmarks/quality_study.py --report-only          # re-aggregate what has finished
    python benchmarks/quality_study.py --dry-run              # print the stage commands and cache decisions

How it runs. Each (run, seed) is a job in its own throwaway Kedro workspace (a copy of conf/, the
project's pyproject.toml and an empty src/; the installed package is the code), so jobs never touch the
repository's data/ nor each other. A job runs its stages one `kedro run --pipeline=<stage>` at a time.
After a stage succeeds, the files it wrote (new or changed under the workspace's data/) are stored in
a stage cache keyed by: the upstream stage's key, the stage's fully resolved parameters (conf/base + env +
the run's overrides), the seed and a hash of the package source. A later job whose stage has the same key
restores those files instead of running it, so e.g. every DPO variant reuses the full run's SFT checkpoint
of the same seed, and every Table 4 row reuses its tokenization. Finished jobs leave their evaluation
table (and sft_selection.json: the valid Recall@10 and loss the SFT checkpoint was chosen on)
under <out>/results/<run>/seed<seed>/ and are skipped on the next invocation: the study is
resumable at stage granularity (kill it any time, rerun the same command). A finished job is kept
even if the code changes later (delete <out>/results/<run>/seed<seed> to redo it); a cached stage is
not reused across code changes unless --reuse-across-code. conf/ is copied once when the study starts;
the package source is hashed then too, but the package is installed in editable mode, so do not edit
src/ while a study runs.

Why not `--params` on globals: runtime parameters do not override conf/<env>/globals.yml (checked with
Kedro 1.7.0: `--params data_root=...` or `globals.data_root=...` leave catalog paths unchanged; only a
`${runtime_params:...}` resolver inside globals.yml would read them); a workspace per job makes the data
root question moot and keeps the conf files as they are.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from study_pooled import PER_CASE_FILE, pooled_pairs, pooled_table, write_per_case  # noqa: E402
from study_rows import (  # noqa: E402
    DEFAULT_SEEDS, LINES, QUICK_OVERRIDES, QUICK_RUNS, RUNS, STAGES, Run, line_model, overrides_in_env, validate,
)

METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
# The paper's Table 1 on Amazon Instruments (Llama-2-7B), for the plain comparison in the report.
PAPER = {"Align3GR": {"recall@10": 0.1442, "ndcg@10": 0.1113}, "SASRec": {"recall@10": 0.0947, "ndcg@10": 0.0690},
         "TIGER": {"recall@10": 0.1058, "ndcg@10": 0.0797}, "LC-Rec": {"recall@10": 0.1006, "ndcg@10": 0.0772}}


# Tokenization's encoder nodes read only these parameter groups (and the seed), which no study row changes:
# the study runs them once a seed and reruns only the SC tokenizer for each tokenization ablation (SASRec is
# about two thirds of the stage's time). Checked against nodes.py: embed_semantics reads semantic_encoder,
# train_collaborative_encoder collaborative_encoder, both device and num_threads; extract_cf_embeddings none.
# Node names carry their stage's namespace (each stage is a Kedro modular pipeline).
ENCODER_NODES = ("tokenization.embed_semantics", "tokenization.train_collaborative_encoder", "tokenization.extract_cf_embeddings")
ENCODER_PARAMS = ("semantic_encoder", "collaborative_encoder", "device", "num_threads")


# --- parameters ---------------------------------------------------------------------------------------------
def load_parameters(env: str, conf_source: Path = REPO / "conf") -> dict[str, Any]:
    """conf/base + conf/<env> parameters resolved exactly as `kedro run --env <env>` does (the project's
    own config-loader settings)."""
    from kedro.config import OmegaConfigLoader

    from align3gr_pipelines.settings import CONFIG_LOADER_ARGS

    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    loader = OmegaConfigLoader(conf_source=str(conf_source), env=env, **args)
    return dict(loader["parameters"])


def apply_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `params` with dotted-key overrides applied; a key that names no existing parameter is an
    error (Kedro would silently add it, and a typo would quietly turn an ablation into the baseline)."""
    out = deepcopy(params)
    for key, value in overrides.items():
        node: Any = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "<top level>"
                raise KeyError(f"override {key!r}: no parameter {part!r} under {where} (env parameters)")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE (repeatable) → {dotted key: YAML-typed value}, applied to every row of the study."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. data_prep.holdout.mode=suffix")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = str(value)
    if "," in text or "=" in text:
        raise ValueError(f"--params value {text!r} cannot hold ',' or '='")
    return text


def params_arg(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k}={_cli_value(v)}" for k, v in overrides.items())


def source_hash() -> str:
    """Hash of the package source: a code change invalidates every cached stage (unless --reuse-across-code)."""
    import align3gr_pipelines

    root = Path(align3gr_pipelines.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --- one job: (run, seed) -------------------------------------------------------------------------------------
class Study:
    def __init__(self, args: argparse.Namespace):
        self.env = args.env
        self.out = Path(args.out).resolve()
        self.quick = args.quick
        self.dry_run = args.dry_run
        self.stage_timeout = args.stage_timeout
        self.keep_workspaces = args.keep_workspaces
        self.threads = args.threads
        shared = Path(args.shared_data).resolve()
        self.base_overrides: dict[str, Any] = {}
        if self.env == "ml_latest_small":
            path = shared / "ml-latest-small"
            if not (path / "ratings.csv").exists():
                raise FileNotFoundError(f"ml-latest-small not found at {path} (ratings.csv); pass --shared-data")
            # The env's relative path only works from the repository root; jobs run in their own workspace.
            self.base_overrides["data_prep.movielens.path"] = str(path)
        if self.env.startswith("instruments"):
            path = shared / "instruments-lcrec"
            if not (path / "Instruments.inter.json").exists():
                raise FileNotFoundError(f"the LC-Rec Instruments release not found at {path} (Instruments.inter.json); pass --shared-data")
            self.base_overrides["data_prep.lcrec_json.path"] = str(path)
            if self.env == "instruments_cpu":  # item content from LC-Rec's codes (the release has no item text)
                self.base_overrides["tokenization.semantic_encoder.lcrec_index"] = str(path / "Instruments.index.json")
        if self.quick:
            self.base_overrides.update(QUICK_OVERRIDES)
        self.base_overrides.update(parse_set(getattr(args, "set", None) or []))  # every row, e.g. the suffix holdout
        # Every job of this invocation runs the conf/ read here (copied once), so editing conf/ while a long
        # study runs can neither split it across two configurations nor make a cache key lie.
        self.conf = self.out / "work" / f".conf_{os.getpid()}"
        if self.conf.exists():
            shutil.rmtree(self.conf)
        shutil.copytree(REPO / "conf", self.conf, ignore=shutil.ignore_patterns("local"))
        self.params = load_parameters(self.env, self.conf)
        self.code = "any" if args.reuse_across_code else source_hash()
        self.kedro = str(Path(sys.executable).with_name("kedro"))

    def overrides(self, run: Run, seed: int) -> dict[str, Any]:
        return {"seed": seed, **self.base_overrides, **overrides_in_env(run, self.env)}

    def stage_keys(self, run: Run, seed: int) -> dict[str, str]:
        resolved = apply_overrides(self.params, self.overrides(run, seed))
        keys, upstream = {}, "root"
        for stage in run.stages:
            upstream = keys[stage] = self._stage_key(upstream, stage, resolved.get(stage), seed)
        return keys

    def _stage_key(self, upstream: str, stage: str, params: Any, seed: int) -> str:
        return _digest({"up": upstream, "stage": stage, "params": params, "seed": seed, "env": self.env, "code": self.code})

    def result_dir(self, run: Run, seed: int) -> Path:
        return self.out / "results" / run.name / f"seed{seed}"

    def _workspace(self, run: Run, seed: int) -> Path:
        ws = self.out / "work" / f"{run.name}__seed{seed}"
        if ws.exists():
            shutil.rmtree(ws)
        ws.mkdir(parents=True)
        shutil.copytree(self.conf, ws / "conf")
        (ws / "conf" / "local").mkdir(exist_ok=True)
        shutil.copy(REPO / "pyproject.toml", ws / "pyproject.toml")
        if (REPO / ".telemetry").exists():
            shutil.copy(REPO / ".telemetry", ws / ".telemetry")
        (ws / "src").mkdir()  # Kedro wants the source dir to exist; the code is the installed package
        (ws / "data").mkdir()
        (ws / "logs").mkdir()
        return ws

    @staticmethod
    def _snapshot(data: Path) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(data)): (p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*") if p.is_file()}

    def _run_stage(self, ws: Path, run: Run, seed: int, stage: str, nodes: list[str] | None = None) -> dict[str, Any]:
        cmd = [self.kedro, "run", "--env", self.env, "--pipelines", stage, "--params", params_arg(self.overrides(run, seed))]
        if nodes:
            cmd += ["--nodes", ",".join(nodes)]
        env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false",
                   # One tracking database per seed: seeds may run in parallel processes (--jobs), and
                   # concurrent writers on one SQLite file fail with "database is locked".
                   MLFLOW_TRACKING_URI=f"sqlite:///{self.out / f'mlflow_seed{seed}.db'}")
        if self.threads:  # parallel jobs share the cores: one intra-op thread each, no spinning pools
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        log_path = ws / "logs" / f"{stage}.log"
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                _, status, usage = os.wait4(proc.pid, 0) if self.stage_timeout is None else _wait4_timeout(proc, self.stage_timeout)
            except BaseException:  # Ctrl-C, or SIGTERM (e.g. `timeout`): never leave a kedro run orphaned
                proc.terminate()
                proc.wait()
                raise
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{run.name} seed {seed}: stage {stage} failed (exit {code}); log {log_path}:\n{tail}")
        # cpu_s (user + system of the stage's process tree) does not depend on how many jobs share the cores:
        # with one thread a job it is what the stage takes alone on one core, wall_s is inflated by the load.
        return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                "max_rss_mb": round(usage.ru_maxrss / 1024, 1), "command": " ".join(cmd)}

    def run_job(self, run: Run, seed: int) -> None:
        done = self.result_dir(run, seed) / "metrics.parquet"
        keys = self.stage_keys(run, seed)
        if done.exists():
            print(f"[skip] {run.name} seed {seed}: finished ({done})")
            if not self.dry_run:
                self._add_selection(run, seed, keys)
            return
        if self.dry_run:
            for stage, key in keys.items():
                cached = (self.out / "cache" / stage / key / "manifest.json").exists()
                print(f"[dry] {run.name} seed {seed} {stage:18s} {'cached' if cached else 'RUN   '} {key}")
            print("      kedro run --env", self.env, "--pipelines <stage> --params", params_arg(self.overrides(run, seed)))
            return
        ws = self._workspace(run, seed)
        data = ws / "data"
        timings: dict[str, Any] = {}
        for stage in run.stages:
            cache = self.out / "cache" / stage / keys[stage]
            manifest_path = cache / "manifest.json"
            if manifest_path.exists():
                manifest = self._restore(cache, data)
                timings[stage] = {**manifest["timing"], "cached": True}
                print(f"[cache] {run.name} seed {seed} {stage} <- {keys[stage]}", flush=True)
                continue
            extra: dict[str, Any] = {}
            nodes = None
            before = self._snapshot(data)
            if stage == "tokenization":
                enc_key = extra["encoders_key"] = self._encoders_key(self.overrides(run, seed), seed)
                enc_cache = self._encoders_cache(enc_key)
                if enc_cache is not None:
                    self._restore(enc_cache, data)
                    nodes = [n for n in self._tokenization_nodes() if n not in ENCODER_NODES]
                    print(f"[cache] {run.name} seed {seed} tokenization encoders <- {enc_key}", flush=True)
            print(f"[run]   {run.name} seed {seed} {stage} ...", flush=True)
            timing = self._run_stage(ws, run, seed, stage, nodes)
            if nodes:
                timing["encoders_cached"] = True
            after = self._snapshot(data)
            written = sorted(rel for rel, sig in after.items() if before.get(rel) != sig)
            self._store(cache, data, written, {"stage": stage, "key": keys[stage], "run": run.name, "seed": seed,
                                                "timing": timing, "overrides": self.overrides(run, seed), **extra})
            timings[stage] = {**timing, "cached": False}
            print(f"[done]  {run.name} seed {seed} {stage}: {timing['wall_s']} s, peak {timing['max_rss_mb']} MB", flush=True)
        self._collect(ws, run, seed, timings)
        if not self.keep_workspaces:
            shutil.rmtree(ws)

    def _add_selection(self, run: Run, seed: int, keys: dict[str, str]) -> None:
        """A job finished before the study recorded SFT selection gets it from its cached sft_train stage."""
        dst = self.result_dir(run, seed) / SELECTION_FILE
        if dst.exists() or "sft_train" not in keys:
            return
        found = sorted((self.out / "cache" / "sft_train" / keys["sft_train"] / "files").rglob("08_reporting/sft_train/metrics.json"))
        if len(found) != 1:
            print(f"[note]  {run.name} seed {seed}: no cached sft_train metrics under key {keys['sft_train']}; "
                  "its SFT selection stays unrecorded")
            return
        write_sft_selection(found[0], dst)
        print(f"[added] {run.name} seed {seed}: {SELECTION_FILE} from cached sft_train {keys['sft_train']}")

    @staticmethod
    def _restore(cache: Path, data: Path) -> dict[str, Any]:
        manifest = json.loads((cache / "manifest.json").read_text())
        for rel in manifest["files"]:
            dst = data / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cache / "files" / rel, dst)
        return manifest

    @staticmethod
    def _store(cache: Path, data: Path, files: list[str], manifest: dict[str, Any]) -> None:
        tmp = cache.with_name(cache.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        for rel in files:
            (tmp / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data / rel, tmp / "files" / rel)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=1, default=str))
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)  # the cache entry appears whole or not at all

    # -- tokenization's encoders, shared by the tokenization ablations of a seed --
    def _encoders_key(self, overrides: dict[str, Any], seed: int) -> str:
        resolved = apply_overrides(self.params, overrides)
        upstream = self._stage_key("root", "data_prep", resolved.get("data_prep"), seed)
        tok = resolved.get("tokenization") or {}
        return self._stage_key(upstream, "tokenization_encoders", {k: tok.get(k) for k in ENCODER_PARAMS}, seed)

    @staticmethod
    def _tokenization_nodes() -> list[str]:
        from align3gr_pipelines.pipelines.tokenization import create_pipeline

        return [n.name for n in create_pipeline().nodes]

    def _encoder_files(self, files: list[str]) -> list[str]:
        """The files (relative to data/) the encoder nodes write: their datasets' catalog paths and lineage."""
        from kedro.config import OmegaConfigLoader

        from align3gr_pipelines.pipelines.tokenization import create_pipeline
        from align3gr_pipelines.settings import CONFIG_LOADER_ARGS

        names = sorted(create_pipeline().only_nodes(*ENCODER_NODES).all_outputs())
        args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
        catalog = OmegaConfigLoader(conf_source=str(self.conf), env=self.env, **args)["catalog"]
        prefixes = [str(Path(catalog[n].get("filepath") or catalog[n]["path"]).relative_to("data")) for n in names]
        return [f for f in files
                if any(f == p or f.startswith(p.rstrip("/") + "/") for p in prefixes)
                or any(f.endswith(f"/.lineage/{n}.json") for n in names)]

    def _encoders_cache(self, key: str) -> Path | None:
        """The encoders' cache entry for `key`; made on first use from a whole tokenization entry of the same
        encoders (so entries from before this split, or from any row of the seed, serve)."""
        enc = self.out / "cache" / "tokenization_encoders" / key
        if (enc / "manifest.json").exists():
            return enc
        for manifest_path in sorted((self.out / "cache" / "tokenization").glob("*/manifest.json")):
            m = json.loads(manifest_path.read_text())
            if m.get("encoders_key", self._encoders_key(m["overrides"], int(m["seed"]))) != key:
                continue
            files = self._encoder_files(m["files"])
            if not files:
                continue
            self._store(enc, manifest_path.parent / "files", files,
                        {"stage": "tokenization_encoders", "key": key, "from": str(manifest_path.parent), "timing": m["timing"]})
            return enc
        return None

    def _collect(self, ws: Path, run: Run, seed: int, timings: dict[str, Any]) -> None:
        found = sorted((ws / "data").rglob("08_reporting/evaluation/metrics.parquet"))
        if len(found) != 1:
            raise RuntimeError(f"{run.name} seed {seed}: expected one evaluation metrics.parquet under {ws / 'data'}, found {found}")
        dst = self.result_dir(run, seed)
        tmp = dst.with_name(dst.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for src in found[0].parent.iterdir():
            shutil.copy2(src, tmp / src.name)
        (tmp / "timings.json").write_text(json.dumps(timings, indent=1))
        (tmp / "overrides.json").write_text(json.dumps(self.overrides(run, seed), indent=1, default=str))
        sft = sorted((ws / "data").rglob("08_reporting/sft_train/metrics.json"))
        if len(sft) == 1:  # restored from the cache too, so every job has it; the choice is made on valid
            write_sft_selection(sft[0], tmp / SELECTION_FILE)
        if not write_per_case(ws / "data", tmp / PER_CASE_FILE):
            print(f"[note]  {run.name} seed {seed}: no recommendations/test split to score per case", flush=True)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)  # metrics.parquet inside marks the job finished


SELECTION_FILE = "sft_selection.json"
# selected_valid_recall@10_confirm: with model_selection.confirm_half, the chosen checkpoint's recall on the
# valid users it was not chosen on (unbiased, unlike the best of N on the same users).
SELECTION_KEYS = ("best_valid_recall@10", "selected_valid_recall@10_confirm", "best_eval_loss", "global_step")


def sft_selection(sft_metrics: dict[str, Any]) -> dict[str, float]:
    """What the SFT run chose its checkpoint on (valid Recall@10 of the constrained decoder over the sampled
    valid users, and the valid loss), from sft_train's metrics.json: the figures rows are *selected* by."""
    scalars = sft_metrics.get("scalars", {})
    return {k: float(scalars[k]) for k in SELECTION_KEYS if k in scalars}


def write_sft_selection(sft_metrics_json: Path, dst: Path) -> None:
    """sft_selection() of an sft_train metrics.json, written atomically to dst."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text(json.dumps(sft_selection(json.loads(sft_metrics_json.read_text())), indent=1))
    tmp.replace(dst)


def gather_selection(out: Path):
    """One row per (run, seed, key) of every finished job that recorded its SFT selection."""
    import pandas as pd

    rows = [{"run": p.parent.parent.name, "seed": int(p.parent.name[4:]), "key": k, "value": float(v)}
            for p in sorted((out / "results").glob(f"*/seed*/{SELECTION_FILE}"))
            for k, v in json.loads(p.read_text()).items()]
    return pd.DataFrame(rows, columns=["run", "seed", "key", "value"])


def _selection_table(out: Path) -> list[str]:
    """Validation (what the SFT checkpoint was chosen on) beside test, for each run's SFT row."""
    sel, long = gather_selection(out), gather_all(out)
    if not len(sel):
        return ["No job recorded its SFT selection yet."]
    lines = ["| run | seeds | best valid recall@10 (selection) | per seed | on the confirm half | valid loss | test recall@10 (sft) |",
             "|---|---|---|---|---|---|---|"]
    sft_rows = {line.run for line in LINES if line.model == "sft"}  # DPO variants reuse full's SFT: shown once
    for run, g in sel[sel["run"].isin(sft_rows)].groupby("run", sort=True):
        rec = g[g["key"] == "best_valid_recall@10"].sort_values("seed")
        loss = g[g["key"] == "best_eval_loss"]
        test = long[(long["run"] == run) & (long["model"] == "sft") & (long["split"] == "test")
                    & (long["metric"] == "recall@10")].sort_values("seed")
        m, h = mean_ci(rec["value"].tolist())
        confirm = g[g["key"] == "selected_valid_recall@10_confirm"].sort_values("seed")
        conf_cell = " / ".join(f"{v:.4f}" for v in confirm["value"]) if len(confirm) else "–"
        tm, th = mean_ci(test["value"].tolist()) if len(test) else (float("nan"), float("nan"))
        lines.append(f"| {run} | {','.join(map(str, rec['seed']))} | {m:.4f}" + (f" ± {h:.4f}" if h == h else "")
                     + " | " + " / ".join(f"{v:.4f}" for v in rec["value"]) + f" | {conf_cell} | {loss['value'].mean():.3f} | "
                     + (f"{tm:.4f}" + (f" ± {th:.4f}" if th == th else "") if tm == tm else "–") + " |")
    return lines


def _wait4_timeout(proc: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline:
            proc.kill()
            return os.wait4(proc.pid, 0)
        time.sleep(1.0)


def run_seeds_in_parallel(args: argparse.Namespace, names: list[str], seeds: list[int], out: Path) -> None:
    """One child process of this script per seed, at most args.jobs at once. Seeds never share a cache key
    (the seed is part of every key) nor a result folder, so the children need no coordination; each logs
    to <out>/logs/seed<seed>.log."""
    child = [sys.executable, str(Path(__file__).resolve()), "--env", args.env, "--out", str(out),
             "--shared-data", args.shared_data, "--rows", ",".join(names), "--no-report",
             "--threads", str(args.threads or 1)]
    child += ["--quick"] * args.quick + ["--reuse-across-code"] * args.reuse_across_code
    child += ["--keep-workspaces"] * args.keep_workspaces
    for item in getattr(args, "set", None) or []:
        child += ["--set", item]
    if args.stage_timeout is not None:
        child += ["--stage-timeout", str(args.stage_timeout)]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(seeds), {}, []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                seed = pending.pop(0)
                log = open(out / "logs" / f"seed{seed}.log", "a")
                running[seed] = (subprocess.Popen([*child, "--seeds", str(seed)], stdout=log, stderr=subprocess.STDOUT), log)
                print(f"[start] seed {seed} (log {out / 'logs' / f'seed{seed}.log'})", flush=True)
            for seed, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[seed]
                    print(f"[end]   seed {seed}: exit {proc.returncode}", flush=True)
                    if proc.returncode != 0:
                        failed.append(seed)
            time.sleep(2.0)
    except BaseException:  # stop every child (each stops its running kedro stage); rerun to resume
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()
        raise
    if failed:
        print(f"seeds whose process failed: {failed} (see their logs)", file=sys.stderr)


# --- aggregation -------------------------------------------------------------------------------------------------
def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval across seeds (nan for one seed)."""
    import numpy as np
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return float(arr.mean()), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(arr) - 1) * arr.std(ddof=1) / np.sqrt(len(arr))
    return float(arr.mean()), float(half)


def gather(out: Path, split: str = "test", env: str = ""):
    """One row per (line, seed, metric) from every finished job."""
    import pandas as pd

    rows = []
    for line in LINES:
        base = out / "results" / line.run
        for path in sorted(base.glob("seed*/metrics.parquet")):
            table = pd.read_parquet(path)
            model = line_model(line, env)
            sel = table[(table["model"] == model) & (table["split"] == split)]
            for r in sel.itertuples():
                rows.append({"table": line.table, "label": line.label, "run": line.run, "model": model,
                             "seed": int(path.parent.name[4:]), "metric": r.metric, "value": float(r.value),
                             "n_users": int(r.n_users)})
    return pd.DataFrame(rows, columns=["table", "label", "run", "model", "seed", "metric", "value", "n_users"])


def gather_all(out: Path):
    """Every (run, model, split, metric, seed) value of every finished job, reported line or not."""
    import pandas as pd

    frames = []
    for path in sorted((out / "results").glob("*/seed*/metrics.parquet")):
        table = pd.read_parquet(path)
        frames.append(table.assign(run=path.parent.parent.name, seed=int(path.parent.name[4:]))[
            ["run", "model", "split", "metric", "seed", "value", "n_users"]])
    if not frames:
        return pd.DataFrame(columns=["run", "model", "split", "metric", "seed", "value", "n_users"])
    return pd.concat(frames, ignore_index=True)


def seed_stats(seeds: list[int], values: list[float]) -> dict[str, Any]:
    """Mean, 95% t-CI across seeds (None for one seed) and the per-seed values: the JSON's shape for a figure."""
    mean, half = mean_ci(values)
    return {"mean": mean, "ci95": [mean - half, mean + half] if half == half else None,
            "per_seed": {str(s): float(v) for s, v in zip(seeds, values)}}


def results_json(out: Path, dataset: str, command: str) -> dict[str, Any]:
    """The machine-readable results: rows["<run>/<model>"][split][metric] = mean, 95% t-CI across seeds and
    the per-seed values, plus the paired per-seed differences the Markdown report shows."""
    allv = gather_all(out)
    rows: dict[str, Any] = {}
    for (run, model), g in allv.groupby(["run", "model"], sort=True):
        entry: dict[str, Any] = {}
        for (split, metric), gm in g.groupby(["split", "metric"], sort=True):
            gm = gm.sort_values("seed")
            entry.setdefault(split, {})[metric] = {**seed_stats(gm["seed"].tolist(), gm["value"].tolist()),
                                                   "n_users": int(gm["n_users"].max())}
        rows[f"{run}/{model}"] = entry
    for (run, key), g in gather_selection(out).groupby(["run", "key"], sort=True):
        if f"{run}/sft" in rows:
            g = g.sort_values("seed")
            rows[f"{run}/sft"].setdefault("valid_selection", {})[key] = seed_stats(g["seed"].tolist(), g["value"].tolist())
    long = gather(out, env=dataset)
    paired = []
    for a, b in PAIRS:
        for metric in ("recall@10", "ndcg@10"):
            seeds, va, vb = _paired_values(long, a, b, metric)
            if not seeds:
                continue
            diffs = [float(vb[s] - va[s]) for s in seeds]
            paired.append({"a": " / ".join(a), "b": " / ".join(b), "metric": metric, "split": "test",
                           **seed_stats(seeds, diffs)})
    return {"dataset": dataset, "seeds": sorted(int(s) for s in allv["seed"].unique()), "command": command,
            "ci": "mean over seeds +- 95% Student-t half-width across seeds (null for one seed)",
            "rows": rows, "paired_differences": paired,
            "pooled_paired_differences": _pooled(out, dataset),
            "pooled_ci": "per (seed, test case) difference b - a, pooled over seeds; 95% percentile CI of a bootstrap "
                         "that resamples users with all their seeds and cases; mde: the |delta| a two-sided 0.05 test "
                         "finds with 80% power, (z_0.975 + z_0.8) x bootstrap SE"}


def _line_rows(env: str) -> dict[tuple[str, str], tuple[str, str]]:
    return {(line.table, line.label): (line.run, line_model(line, env)) for line in LINES}


_POOLED_CACHE: dict[Path, list[dict[str, Any]]] = {}


def _pooled(out: Path, env: str) -> list[dict[str, Any]]:
    """The pooled paired differences of PAIRS (computed once per report)."""
    if out not in _POOLED_CACHE:
        _POOLED_CACHE[out] = pooled_pairs(out, PAIRS, _line_rows(env))
    return _POOLED_CACHE[out]


def summarize(long) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for (table, label), g in long.groupby(["table", "label"], sort=False):
        entry: dict[str, Any] = {"seeds": sorted(g["seed"].unique().tolist()), "n_users": int(g["n_users"].max())}
        for metric, gm in g.groupby("metric"):
            entry[metric] = mean_ci(gm.sort_values("seed")["value"].tolist())
        out[(table, label)] = entry
    return out


def _fmt(entry: dict[str, Any] | None, metric: str) -> str:
    if not entry or metric not in entry:
        return "not run"
    mean, half = entry[metric]
    return f"{mean:.4f}" if half != half else f"{mean:.4f} ± {half:.4f}"


def _timings_table(out: Path) -> list[str]:
    lines = ["| run | seed | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for path in sorted((out / "results").glob("*/seed*/timings.json")):
        t = json.loads(path.read_text())
        cells = []
        for s in STAGES:
            if s not in t:
                cells.append("–")
            else:
                note = " (cached)" if t[s].get("cached") else " (encoders reused)" if t[s].get("encoders_cached") else ""
                cpu = f" (CPU {t[s]['cpu_s']:.0f} s)" if "cpu_s" in t[s] else ""
                cells.append(f"{t[s]['wall_s']:.0f} s{cpu}{note}, {t[s]['max_rss_mb']:.0f} MB")
        lines.append(f"| {path.parent.parent.name} | {path.parent.name[4:]} | " + " | ".join(cells) + " |")
    return lines


# (table, label) pairs whose per-seed difference the report shows: b minus a.
PAIRS = [
    (("Table 1: overall", "SASRec (BCE, 1 negative: the paper's baseline)"), ("Table 1: overall", "Align3GR (full)")),
    (("Table 1: overall", "SASRec"), ("Table 1: overall", "Align3GR (full)")),
    (("Table 1: overall", "Item-kNN"), ("Table 1: overall", "Align3GR (full)")),
    (("Table 1: overall", "SASRec (BCE, 1 negative: the paper's baseline)"), ("Table 1: overall", "SASRec")),
    (("Table 1: overall", "TIGER-like"), ("Table 1: overall", "Align3GR (full)")),
    (("Table 1: overall", "LC-Rec-like"), ("Table 1: overall", "Align3GR (full)")),
    (("Alignment levels", "LC-Rec-like (item SCIDs, no user alignment)"),
     ("Alignment levels", "+ token & behaviour level (dual SCIDs, B2, user SCID) = SFT")),
    (("Table 5: DPO", "SFT only"), ("Table 5: DPO", "SP-DPO curriculum")),
    (("Table 5: DPO", "SP-DPO curriculum"), ("Table 5: DPO", "+ RF-DPO progressive (full)")),
    (("Table 1: overall", "TIGER-like"), ("Table 4: SFT tasks", "SEQ")),  # dual vs item-only SCIDs, SEQ alone
    (("Table 4: SFT tasks", "SEQ"), ("Table 4: SFT tasks", "+ B2 + user SCID (full SFT)")),  # all tasks vs SEQ
    (("Table 4: SFT tasks", "+ B1 (intention, preference)"), ("Table 4: SFT tasks", "+ B2 + user SCID (full SFT)")),
    (("Table 3: tokenization (after SFT)", "Item-only SCIDs"), ("Table 3: tokenization (after SFT)", "Dual SCIDs (full)")),
    (("Table 1: overall", "SASRec"), ("Table 4: SFT tasks", "SEQ")),  # the LM at its best task mix vs our SASRec
    (("Table 1: overall", "Item-kNN"), ("Table 4: SFT tasks", "SEQ")),
    # issue 25: the new preference recipe against SFT and against the paper's curriculum; RF on rating data
    (("Table 5: DPO", "SFT only"), ("Table 5: DPO", "SP-DPO reachable, de-noised, NDCG selection (issue 25)")),
    (("Table 5: DPO", "SP-DPO curriculum"), ("Table 5: DPO", "SP-DPO reachable, de-noised, NDCG selection (issue 25)")),
    (("Table 5: DPO", "SP-DPO curriculum"), ("Table 5: DPO", "+ RF-DPO, hard stage liked vs top-ranked disliked (issue 25)")),
    (("Table 5: DPO", "SFT only"), ("Table 5: DPO", "SP-DPO reachable, 2,048 prompts a stage, no sign test (issue 25)")),
    # Table 5's ablations against the paper's setting
    (("Table 5: DPO", "SFT only"), ("Table 5: DPO", "Softmax-DPO, random negatives")),
    (("Table 5: DPO", "SP-DPO w/o curriculum"), ("Table 5: DPO", "SP-DPO curriculum")),
    (("Table 5: DPO", "+ RF-DPO mixed"), ("Table 5: DPO", "+ RF-DPO progressive (full)")),
    (("Table 5: DPO", "SP-DPO curriculum"), ("Table 5: DPO", "SP-DPO reachable, 2,048 prompts a stage, no sign test (issue 25)")),
    # issue 26: TCA4Rec at every labelled position against CE and against the uniform-label control
    (("Alignment levels", "+ token & behaviour level (dual SCIDs, B2, user SCID) = SFT"),
     ("Beyond the paper", "LM with TCA4Rec at every labelled position (issue 26)")),
    (("Beyond the paper", "control: uniform labels at every labelled position"),
     ("Beyond the paper", "LM with TCA4Rec at every labelled position (issue 26)")),
    # issue 26: the hybrid against our SASRec and against the LM alone
    (("Beyond the paper", "SASRec (CE)"), ("Beyond the paper", "align3gr_cf: SFT LM + w x SASRec, w chosen on valid (issue 26)")),
    (("Beyond the paper", "LM alone (SFT)"), ("Beyond the paper", "align3gr_cf: SFT LM + w x SASRec, w chosen on valid (issue 26)")),
    # the alpha grid's other point, and the hybrid with w chosen on every valid user (rows full_cfv, tca_all_a01)
    (("Alignment levels", "+ token & behaviour level (dual SCIDs, B2, user SCID) = SFT"),
     ("Beyond the paper", "LM with TCA4Rec at every labelled position, alpha 0.1")),
    (("Beyond the paper", "control: uniform labels at every labelled position, alpha 0.1"),
     ("Beyond the paper", "LM with TCA4Rec at every labelled position, alpha 0.1")),
    (("Table 1: overall", "SASRec"), ("Beyond the paper", "align3gr_cf, w chosen on every valid user")),
    (("Alignment levels", "+ token & behaviour level (dual SCIDs, B2, user SCID) = SFT"),
     ("Beyond the paper", "align3gr_cf, w chosen on every valid user")),
]


def _paired_values(long, a: tuple[str, str], b: tuple[str, str], metric: str):
    """The seeds both report lines `a` and `b` have for `metric`, and each line's values indexed by seed."""
    va = long[(long.table == a[0]) & (long.label == a[1]) & (long.metric == metric)].set_index("seed")["value"]
    vb = long[(long.table == b[0]) & (long.label == b[1]) & (long.metric == metric)].set_index("seed")["value"]
    return sorted(set(va.index) & set(vb.index)), va, vb


def _paired_table(long) -> list[str]:
    if not len(long):
        return ["nothing measured yet"]
    lines = ["| b − a | seeds | Δ recall@10 | Δ ndcg@10 | relative Δ recall@10 |", "|---|---|---|---|---|"]
    for a, b in PAIRS:
        cells, seeds = [], []
        for metric in ("recall@10", "ndcg@10"):
            seeds, va, vb = _paired_values(long, a, b, metric)
            if not seeds:
                break
            mean, half = mean_ci([vb[s] - va[s] for s in seeds])
            cells.append(f"{mean:+.4f}" + ("" if half != half else f" ± {half:.4f}"))
            if metric == "recall@10":
                base = sum(va[s] for s in seeds) / len(seeds)
                rel = f"{100 * mean / base:+.0f}%" if base else "–"
        if len(cells) == 2:
            lines.append(f"| '{b[1]}' − '{a[1]}' | {','.join(map(str, seeds))} | {cells[0]} | {cells[1]} | {rel} |")
    return lines


def _per_seed_table(long) -> list[str]:
    """Recall@10 / NDCG@10 of every reported line on every seed, so the spread behind each CI is visible."""
    if not len(long):
        return ["nothing measured yet"]
    seeds = sorted(long["seed"].unique().tolist())
    lines = ["| table | row | " + " | ".join(f"seed {s} R@10 / N@10" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for (table, label), g in long.groupby(["table", "label"], sort=False):
        cells = []
        for seed in seeds:
            v = {r.metric: r.value for r in g[g["seed"] == seed].itertuples()}
            cells.append(f"{v['recall@10']:.4f} / {v['ndcg@10']:.4f}" if "recall@10" in v and "ndcg@10" in v else "–")
        lines.append(f"| {table} | {label} | " + " | ".join(cells) + " |")
    return lines


def _same(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-12 * max(1.0, abs(x), abs(y))


def _compare(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'higher' / 'lower' / 'equal' of b against a, marked when the seeds' 95% CIs overlap. Means of the
    same hits over seeds can differ in the last bit (summation order): those are equal."""
    if _same(b[0], a[0]):
        return "equal"
    word = "higher" if b[0] > a[0] else "lower"
    if a[1] == a[1] and b[1] == b[1] and abs(b[0] - a[0]) <= a[1] + b[1]:
        word += " (95% CIs overlap)"
    elif a[1] != a[1] or b[1] != b[1]:
        word += " (one seed: no CI)"
    return word


def findings(summary: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Plain statements of where we agree or disagree with the paper, with the numbers."""
    def get(table: str, label: str, metric: str) -> tuple[float, float] | None:
        e = summary.get((table, label))
        return e[metric] if e and metric in e else None

    t1, lv = "Table 1: overall", "Alignment levels"
    out = []
    for metric in ("recall@10", "ndcg@10"):
        full, sas = get(t1, "Align3GR (full)", metric), get(t1, "SASRec", metric)
        if full is None or sas is None:
            out.append(f"- {metric}: Align3GR vs SASRec not measured yet.")
            continue
        verdict = "beats" if full[0] > sas[0] else "does NOT beat"
        out.append(f"- {metric}: full Align3GR {full[0]:.4f} {verdict} SASRec {sas[0]:.4f}, {_compare(sas, full)} "
                   f"(paper, Instruments: {PAPER['Align3GR'][metric]} vs {PAPER['SASRec'][metric]}).")
    steps = [label for (table, label) in summary if table == lv]
    for metric in ("recall@10", "ndcg@10"):
        for prev, nxt in zip(steps, steps[1:]):
            a, b = get(lv, prev, metric), get(lv, nxt, metric)
            if a is None or b is None:
                continue
            verdict = "adds" if b[0] > a[0] else "does NOT add"
            out.append(f"- {metric}: '{nxt}' {verdict}: {a[0]:.4f} → {b[0]:.4f}, {_compare(a, b)} "
                       "(the paper reports a gain at every level).")
    for table, full_label in (("Table 3: tokenization (after SFT)", "Dual SCIDs (full)"), ("Table 4: SFT tasks", "+ B2 + user SCID (full SFT)"),
                              ("Table 5: DPO", "+ RF-DPO progressive (full)")):
        ref = get(table, full_label, "recall@10")
        others = [(label, get(table, label, "recall@10")) for (t, label) in summary if t == table and label != full_label]
        others = [(label, v) for label, v in others if v is not None]
        if ref is None or not others:
            out.append(f"- {table}: fewer than two rows measured, no comparison.")
            continue
        better = [(label, v) for label, v in others if v[0] >= ref[0] or _same(v[0], ref[0])]
        if better:
            out.append(f"- {table}: the paper's full setting is best; ours is not on recall@10: " + ", ".join(
                f"'{label}' {v[0]:.4f} >= full {ref[0]:.4f}, {_compare(ref, v)}" for label, v in better) + ".")
        else:
            out.append(f"- {table}: the full setting ({ref[0]:.4f} recall@10) is best of the {len(others) + 1} rows "
                       "measured, as in the paper.")
    return out


def write_report(out: Path, md_path: Path, png_path: Path, title: str, command: str, notes: Path | None = None,
                 dataset: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = gather(out, env=dataset)
    summary = summarize(long) if len(long) else {}
    tables = list(dict.fromkeys(line.table for line in LINES))
    holdout = "a suffix holdout (each of a user's last k items its own case)" if "holdout.mode=suffix" in command else "leave-one-out"
    md = [f"# {title}", "", f"Produced by `{command}`.",
          f"Test split, {holdout}, every metric the mean over seeds ± the half-width of a 95% Student-t "
          "confidence interval across seeds (a single seed shows the value alone). Rows: benchmarks/study_rows.py.", ""]
    if notes is not None:  # hand-written context (how the study was run, what the numbers mean), kept verbatim
        md += [notes.read_text().rstrip(), ""]
    if dataset.startswith("instruments"):
        md += ["## Beside the paper's Table 1 (Amazon Instruments, the same LC-Rec release)", "",
               "The paper's figures come from its Table 1 (Llama-2-7B LoRA on GPUs; its SASRec is the BCE one). Ours: "
               "the CPU recipe of this env (a 0.85M-parameter scratch Llama, no item text: item content from LC-Rec's "
               "codes), mean over the seeds run.", "",
               "| model | ours recall@10 | ours ndcg@10 | paper recall@10 | paper ndcg@10 |", "|---|---|---|---|---|"]
        for label, paper in (("SASRec (BCE, 1 negative: the paper's baseline)", "SASRec"), ("SASRec", None),
                             ("TIGER-like", "TIGER"), ("LC-Rec-like", "LC-Rec"), ("Align3GR (full)", "Align3GR"),
                             ("Item-kNN", None), ("Most popular", None)):
            e = summary.get(("Table 1: overall", label))
            ref = PAPER.get(paper or "", {})
            md.append(f"| {label} | {_fmt(e, 'recall@10')} | {_fmt(e, 'ndcg@10')} | {ref.get('recall@10', '–')} | "
                      f"{ref.get('ndcg@10', '–')} |")
        md.append("")
    md += ["## What disagrees with the paper, and what agrees", ""] + (findings(summary) if summary else ["- nothing measured yet"]) + [""]
    for table in tables:
        md += [f"## {table}", "", "| row | run/model | seeds | " + " | ".join(METRICS) + " |", "|---|---|---|" + "---|" * len(METRICS)]
        for line in (ln for ln in LINES if ln.table == table):
            e = summary.get((table, line.label))
            seeds = ",".join(map(str, e["seeds"])) if e else "–"
            md.append(f"| {line.label} | {line.run}/{line.model} | {seeds} | " + " | ".join(_fmt(e, m) for m in METRICS) + " |")
        md.append("")
    md += ["## Paired differences over seeds", "",
           "Rows of one seed share everything seed-dependent they have in common (SASRec, the encoders, cached "
           "stages), so the per-seed difference removes that shared variation; mean ± 95% Student-t half-width "
           "of the per-seed differences.", "", *_paired_table(long), ""]
    md += ["## Pooled paired differences (user-cluster bootstrap) and what the test can resolve", "",
           "Each (seed, test case) gives one paired difference of the two rows on the same held-out item; Δ is their "
           "mean over every seed, the 95% CI a bootstrap over users (each with all of their seeds and cases), and "
           "the MDE the smallest true |Δ| this test set detects with 80% power (two-sided 0.05). A CI that "
           "excludes 0 is a difference; |Δ| below the MDE is what noise looks like here.", "",
           *pooled_table(_pooled(out, dataset)), ""]
    md += ["## SFT checkpoint selection (validation) beside test", "",
           "Each SFT run keeps its checkpoint with the best Recall@10 of the constrained decoder on the sampled "
           "valid users (sft_train.model_selection); that figure is what rows are chosen on, so it is a maximum "
           "over checkpoints (optimistic, alike for every row). Valid loss: the selected run's best loss on the "
           "valid SEQ examples.", "", *_selection_table(out), ""]
    md += ["## Every seed", "", *_per_seed_table(long), ""]
    md += ["## Reproducing a row", "",
           "Each run is `python benchmarks/quality_study.py --rows <run> --seeds 42,43,44` (add `--jobs 3` to run "
           "the seeds at once), which runs, per seed and per stage, "
           "`kedro run --env ml_latest_small --pipelines <stage> --params seed=<seed>,<overrides>` with:", "",
           "| run | what it is | overrides of conf/base + conf/ml_latest_small | stages |", "|---|---|---|---|"]
    for run in RUNS.values():
        overrides = ", ".join(f"`{k}={_cli_value(v)}`" for k, v in run.overrides.items()) or "none"
        md.append(f"| {run.name} | {run.about} | {overrides} | {len(run.stages)} |")
    md += ["", "## Wall time and peak memory per stage", "", *_timings_table(out), ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md) + "\n")
    json_path = md_path.with_suffix(".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(results_json(out, dataset, command), indent=1) + "\n")
    tmp.replace(json_path)

    fig, axes = plt.subplots(len(tables), 1, figsize=(10, 3.2 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables):
        labels = [ln.label for ln in LINES if ln.table == table]
        for j, metric in enumerate(("recall@10", "ndcg@10")):
            means = [summary.get((table, lb), {}).get(metric, (0.0, 0.0))[0] for lb in labels]
            errs = [summary.get((table, lb), {}).get(metric, (0.0, 0.0))[1] for lb in labels]
            errs = [0.0 if e != e else e for e in errs]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(labels))]
            ax.bar(xs, means, width=0.38, yerr=errs, capsize=3, label=metric)
        sas = summary.get(("Table 1: overall", "SASRec"), {})
        for metric, color in (("recall@10", "C0"), ("ndcg@10", "C1")):
            if metric in sas:  # the baseline the paper's Align3GR beats, for reading every panel against it
                ax.axhline(sas[metric][0], color=color, linestyle="--", linewidth=1, label=f"SASRec {metric}")
        for i, lb in enumerate(labels):
            if (table, lb) not in summary:
                ax.text(i, 0, "not run", ha="center", va="bottom", fontsize=7, color="grey")
        ax.set_xticks(range(len(labels)), [lb[:34] for lb in labels], rotation=15, ha="right", fontsize=8)
        ax.set_title(table, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    print(f"wrote {md_path}, {json_path} and {png_path}")


# --- CLI -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="ml_latest_small")
    parser.add_argument("--rows", default=None, help=f"comma-separated run names (default: all). Known: {', '.join(RUNS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 42,43,44; --quick: 42)")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes, 1 seed, runs {', '.join(QUICK_RUNS)}")
    parser.add_argument("--out", default=None, help="study folder (default data/<env>/quality_study[_quick])")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--stage-timeout", type=float, default=None, help="seconds per stage before it is killed")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a parameter override for every row (repeatable), e.g. --set data_prep.holdout.mode=suffix")
    parser.add_argument("--reuse-across-code", action="store_true", help="cache keys ignore source changes")
    parser.add_argument("--keep-workspaces", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads of every kedro run (default: the conf's own settings)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at once, each in its own process (seeds share no cached stage); with "
                             "--jobs > 1 every kedro run gets one thread unless --threads says otherwise")
    parser.add_argument("--no-report", action="store_true", help="run the jobs, write no report")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--report", default=None, help="Markdown results path (default <out>/results.md; PNG beside it)")
    parser.add_argument("--notes", default=None, help="a Markdown file copied into the report after its header")
    args = parser.parse_args(argv)

    validate()
    # `timeout` / a scheduler sends SIGTERM: turn it into an exception so the running stage is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    suffix = "_quick" if args.quick else ""
    args.out = args.out or str(REPO / "data" / args.env / f"quality_study{suffix}")
    names = [r.strip() for r in args.rows.split(",")] if args.rows else list(QUICK_RUNS if args.quick else RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {list(RUNS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([DEFAULT_SEEDS[0]] if args.quick else list(DEFAULT_SEEDS))
    out = Path(args.out).resolve()
    md_path = Path(args.report).resolve() if args.report else out / "results.md"
    png_path = md_path.with_suffix(".png")
    command = "python benchmarks/quality_study.py " + " ".join(argv if argv is not None else sys.argv[1:])

    if not args.report_only and args.jobs > 1 and len(seeds) > 1 and not args.dry_run:
        run_seeds_in_parallel(args, names, seeds, out)
    elif not args.report_only:
        study = Study(args)
        failures = []
        # Seed-major order: all runs of a seed share its cached prefix stages before the next seed starts.
        for seed in seeds:
            for name in names:
                try:
                    study.run_job(RUNS[name], seed)
                except RuntimeError as exc:  # one broken row must not lose the rest of a long study
                    print(f"[fail] {exc}", file=sys.stderr)
                    failures.append((name, seed))
        shutil.rmtree(study.conf, ignore_errors=True)
        if failures:
            print(f"{len(failures)} job(s) failed: {failures}", file=sys.stderr)
        if args.dry_run:
            return 0
    if args.no_report:
        return 0
    title = f"Align3GR quality study on {args.env}" + (" (--quick: tiny sizes, NOT a quality result)" if args.quick else "")
    notes = Path(args.notes).resolve() if args.notes else None
    if notes is not None and not notes.is_file():
        parser.error(f"--notes {args.notes}: no such file")
    write_report(out, md_path, png_path, title, command.strip(), notes, dataset=args.env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
