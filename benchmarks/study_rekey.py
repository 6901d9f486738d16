"""Carry a quality study's cached stages over to a newer conf/ whose only change to those stages is new
parameters (added keys), so a new variant reuses e.g. the full run's SFT checkpoint instead of retraining it.

    python benchmarks/study_rekey.py --out /work/study_instruments --env instruments_cpu \
        --old-conf /work/frozen/conf --rows full --seeds 42,43,44 \
        --stages data_prep,tokenization,sft_data,sft_train [--set data_prep.holdout.mode=suffix ...]

Why it is needed: a stage's cache key hashes its fully resolved parameters, so a parameter added to conf/base
(even one whose default keeps the old behaviour) changes the key of that stage and of every stage downstream.
What it checks: for every stage named, the resolved parameters of the old and the new conf differ only by
ADDED keys; a removed key or a changed value stops it (the cached outputs may then not be what the new conf
would produce). It cannot check the code: use it only when the package source of those stages is unchanged
or its changes are known not to alter their outputs (e.g. verify one stage's outputs byte-equal by a fresh
run), and say so where the results are reported. Each re-keyed entry's manifest records `rekeyed_from` (the
old key and the added keys). Nothing is moved: the old entry stays; the new one is a copy, written atomically.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality_study import Study, apply_overrides, load_parameters  # noqa: E402
from study_rows import RUNS  # noqa: E402


def param_diff(old: Any, new: Any, prefix: str = "") -> dict[str, list[str]]:
    """Dotted keys added in `new`, removed from `old`, and changed in value between the two."""
    out: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out["added"].append(path)
            elif key not in new:
                out["removed"].append(path)
            else:
                for kind, paths in param_diff(old[key], new[key], path).items():
                    out[kind] += paths
    elif old != new:
        out["changed"].append(prefix or "<root>")
    return out


def rekey_entry(cache_root: Path, stage: str, old_key: str, new_key: str, added: list[str]) -> str:
    """Copy cache entry `stage/old_key` to `stage/new_key`; returns what happened (copied / present / missing)."""
    src, dst = cache_root / stage / old_key, cache_root / stage / new_key
    if (dst / "manifest.json").exists():
        return "present"
    if not (src / "manifest.json").exists():
        return "missing"
    tmp = dst.with_name(f".{new_key}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["key"] = new_key
    manifest["rekeyed_from"] = {"key": old_key, "added_parameters": added}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    tmp.rename(dst)
    return "copied"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the study folder (holds cache/)")
    parser.add_argument("--env", required=True)
    parser.add_argument("--old-conf", required=True, help="the conf/ the cached entries were made with")
    parser.add_argument("--rows", default="full")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--stages", required=True, help="comma-separated, a prefix of each row's stages")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="as quality_study.py --set")
    parser.add_argument("--shared-data", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--old-code", default="any",
                        help="the code part of the old keys: 'any' (the old study ran with --reuse-across-code) or its "
                             "source hash (quality_study.source_hash() of the package it ran)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    old_conf = Path(args.old_conf).resolve()
    if not (old_conf / "base").is_dir():
        parser.error(f"--old-conf {old_conf}: expected a Kedro conf/ folder with a base/ subfolder")
    stages = [s.strip() for s in args.stages.split(",")]
    study_args = argparse.Namespace(
        env=args.env, out=args.out, quick=False, dry_run=True, stage_timeout=None, keep_workspaces=False, threads=None,
        shared_data=args.shared_data, set=args.set, reuse_across_code=True)
    study = Study(study_args)  # keys exactly as quality_study.py --reuse-across-code makes them
    try:
        old_params, new_params = load_parameters(args.env, old_conf), study.params
        cache_root = Path(args.out).resolve() / "cache"
        failed = False
        for name in [r.strip() for r in args.rows.split(",")]:
            run = RUNS[name]
            if list(run.stages[: len(stages)]) != stages:
                parser.error(f"--stages {stages} is not a prefix of run {name!r}'s stages {list(run.stages)}")
            for seed in [int(s) for s in args.seeds.split(",")]:
                new_keys = study.stage_keys(run, seed)
                new_resolved = apply_overrides(study.params, study.overrides(run, seed))
                study.params, study.code = old_params, args.old_code
                old_keys = study.stage_keys(run, seed)
                old_resolved = apply_overrides(old_params, study.overrides(run, seed))
                study.params, study.code = new_params, "any"
                for stage in stages:
                    diff = param_diff(old_resolved.get(stage), new_resolved.get(stage))
                    if diff["removed"] or diff["changed"]:
                        print(f"[stop] {name} seed {seed} {stage}: removed {diff['removed']} changed {diff['changed']}")
                        failed = True
                        break
                    what = "dry" if args.dry_run else rekey_entry(cache_root, stage, old_keys[stage], new_keys[stage], diff["added"])
                    print(f"[{what}] {name} seed {seed} {stage}: {old_keys[stage]} -> {new_keys[stage]}"
                          f" (+{len(diff['added'])} new parameter(s){': ' + ', '.join(diff['added']) if diff['added'] else ''})")
                    if what == "missing":
                        failed = True
                        break
        return 1 if failed else 0
    finally:
        shutil.rmtree(study.conf, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
