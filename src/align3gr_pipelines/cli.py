"""Project CLI commands: ``kedro lineage status`` and ``kedro lineage show``.

Kedro loads the ``cli`` group of ``<package>.cli`` beside the built-in and plugin commands. ``run`` is
re-exported unchanged because ``python -m align3gr_pipelines`` looks it up here once this file exists.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
from kedro.framework.cli.project import run  # noqa: F401  (see the module docstring)
from kedro.framework.project import pipelines
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from align3gr_pipelines.tracking.hooks import data_root, dataset_local_path, is_parameter, lineage_store, staleness_checker
from align3gr_pipelines.tracking.lineage import FRESH, MISSING, STALE, UNTRACKED, Staleness

AGGREGATE_PIPELINES = ("__default__", "full")


@click.group(name="align3gr")
def cli() -> None:
    """Commands of the align3gr_pipelines project."""


@cli.group()
def lineage() -> None:
    """Lineage of persisted artifacts: which are stale, and what each was built from."""


def _project_path(metadata: Any) -> Path:
    if metadata is not None and getattr(metadata, "project_path", None):
        return Path(metadata.project_path)
    return Path.cwd()


def _stage_of(pipelines: Any) -> dict[str, str]:
    stage: dict[str, str] = {}
    for name, pipe in pipelines.items():
        if name in AGGREGATE_PIPELINES:
            continue
        for node in pipe.nodes:
            stage.setdefault(node.name, name)
    return stage


def lineage_report(project_path: Path, pipeline: str = "__default__", env: str | None = None) -> dict[str, Any]:
    """Staleness of every persisted output of ``pipeline``, in DAG order, and the command that rebuilds it."""
    bootstrap_project(project_path)
    if pipeline not in pipelines:
        raise click.BadParameter(f"no registered pipeline named {pipeline!r}; have {sorted(pipelines)}", param_hint="--pipeline")
    pipe = pipelines[pipeline]
    stage_of = _stage_of(pipelines)
    with KedroSession.create(project_path=project_path, env=env) as session:
        context = session.load_context()
        catalog = context.catalog
        checker = staleness_checker(catalog, lineage_store(project_path, data_root(context.config_loader)))
        rows: list[dict[str, Any]] = []
        stale_nodes: list[str] = []
        for node in pipe.nodes:  # topologically sorted
            node_stale = False
            for output in node.outputs:
                if dataset_local_path(catalog, output) is None:
                    continue
                verdict: Staleness = checker.check(output)
                node_stale |= verdict.status == STALE
                rows.append(
                    {
                        "stage": stage_of.get(node.name, "-"),
                        "node": node.name,
                        "dataset": output,
                        "status": verdict.status,
                        "reasons": verdict.reasons,
                        "built_at": verdict.record.recorded_at if verdict.record else None,
                    }
                )
            if node_stale:
                stale_nodes.append(node.name)
    # A stale node must be rerun with the producers of its in-memory inputs (Kedro cannot start a run
    # at a node whose input only ever lived in memory), and rerunning from the most upstream of them
    # rebuilds everything downstream too.
    producer = {output: node for node in pipe.nodes for output in node.outputs}
    to_rerun: set[str] = set()
    queue = list(stale_nodes)
    while queue:
        name = queue.pop()
        if name in to_rerun:
            continue
        to_rerun.add(name)
        node = next(n for n in pipe.nodes if n.name == name)
        for dataset in node.inputs:
            if dataset in producer and not is_parameter(dataset) and dataset_local_path(catalog, dataset) is None:
                queue.append(producer[dataset].name)
    downstream = {name: {n.name for n in pipe.from_nodes(name).nodes} - {name} for name in to_rerun}
    roots = [n.name for n in pipe.nodes if n.name in to_rerun and not any(n.name in downstream[o] for o in to_rerun)]
    # Registry order is DAG order (data_prep first); within a stage, nodes stay topologically sorted.
    order = [s for s in pipelines if s not in AGGREGATE_PIPELINES] + ["-"]
    rows.sort(key=lambda r: order.index(r["stage"]) if r["stage"] in order else len(order))
    stale_stages = [s for s in order if any(r["stage"] == s and r["status"] == STALE for r in rows)]
    missing_stages = [s for s in order if any(r["stage"] == s and r["status"] == MISSING for r in rows)]
    selector = "" if pipeline == "__default__" else f" --pipelines={pipeline}"
    rebuild = f"kedro run{selector} --from-nodes={','.join(roots)}" if roots else None
    build_missing = f"kedro run{selector} --only-missing-outputs" if missing_stages else None
    return {
        "pipeline": pipeline,
        "datasets": rows,
        "stale_stages": stale_stages,
        "missing_stages": missing_stages,
        "rebuild_command": rebuild,
        "build_missing_command": build_missing,
    }


def _print_report(report: dict[str, Any], show_all: bool) -> None:
    rows = [r for r in report["datasets"] if show_all or r["status"] != FRESH]
    counts = {s: sum(r["status"] == s for r in report["datasets"]) for s in (FRESH, STALE, MISSING, UNTRACKED)}
    click.echo(
        f"Pipeline '{report['pipeline']}': {len(report['datasets'])} persisted outputs: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
    )
    if rows:
        width_stage = max(len("stage"), *(len(r["stage"]) for r in rows))
        width_ds = max(len("dataset"), *(len(r["dataset"]) for r in rows))
        click.echo(f"{'stage':<{width_stage}}  {'dataset':<{width_ds}}  {'status':<9}  why")
        for r in rows:
            why = "; ".join(r["reasons"]) if r["status"] != FRESH else f"built {r['built_at']}"
            colour = {STALE: "red", MISSING: "yellow", UNTRACKED: "cyan"}.get(r["status"])
            status = click.style(f"{r['status'].upper():<9}", fg=colour)
            click.echo(f"{r['stage']:<{width_stage}}  {r['dataset']:<{width_ds}}  {status}  {why}")
    if report["stale_stages"]:
        click.echo(f"Stale stages: {', '.join(report['stale_stages'])}")
    if report["missing_stages"]:
        click.echo(f"Stages with missing outputs: {', '.join(report['missing_stages'])}")
    if report["rebuild_command"]:
        click.echo(f"Rebuild the stale ones (and everything downstream) with: {report['rebuild_command']}")
    else:
        click.echo("Nothing is stale.")
    if report["build_missing_command"]:
        click.echo(f"Build the missing ones with: {report['build_missing_command']}")


@lineage.command("status")
@click.option("--pipeline", "-p", default="__default__", show_default=True, help="Registered pipeline to check.")
@click.option("--env", "-e", default=None, help="Kedro configuration environment.")
@click.option("--all", "show_all", is_flag=True, help="List fresh artifacts too.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
    help="Also write the JSON report to this file (Kedro's own start-up log lines never reach it).",
)
@click.option("--fail-on-stale", is_flag=True, help="Exit with status 1 when anything is stale (for CI).")
@click.pass_obj
def status(
    metadata: Any, pipeline: str, env: str | None, show_all: bool, as_json: bool, output: str | None, fail_on_stale: bool
) -> None:
    """List persisted outputs that are stale (built from parameters or inputs that changed since), missing,
    or untracked, and print the `kedro run` that rebuilds them."""
    if as_json:  # keep stdout parseable: session start-up logs INFO/WARNING lines
        logging.disable(logging.WARNING)
    try:
        report = lineage_report(_project_path(metadata), pipeline=pipeline, env=env)
    finally:
        logging.disable(logging.NOTSET)
    if output:
        Path(output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report, show_all)
    if fail_on_stale and report["stale_stages"]:
        sys.exit(1)


@lineage.command("show")
@click.argument("dataset")
@click.option("--env", "-e", default=None, help="Kedro configuration environment (its data root).")
@click.pass_obj
def show(metadata: Any, dataset: str, env: str | None) -> None:
    """Print the lineage record of DATASET: the parameters and inputs it was built from."""
    project_path = _project_path(metadata)
    bootstrap_project(project_path)
    with KedroSession.create(project_path=project_path, env=env) as session:
        root = data_root(session.load_context().config_loader)
    record = lineage_store(project_path, root).read(dataset)
    if record is None:
        raise click.ClickException(f"no lineage record for '{dataset}' (not built yet, or built before lineage tracking)")
    click.echo(json.dumps(record.to_json(), indent=2, sort_keys=True))
