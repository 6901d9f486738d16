"""`kedro airflow create` with the project's template (deploy/airflow/kedro_stages_dag.j2) turns `full` into an
Airflow DAG of the seven stages, one task each, in DAG order, passing the Kedro env and runtime params on.
Airflow itself is not installed: the generated file is read with `ast`."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align3gr_pipelines.pipeline_registry import STAGES

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "deploy" / "airflow" / "kedro_stages_dag.j2"

pytest.importorskip("kedro_airflow", reason="kedro-airflow is in the test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def dag_source(tmp_path_factory) -> str:
    # A copy of the project's configuration: loading it runs the project's hooks (kedro-mlflow creates
    # mlflow.db), which must not touch the checkout.
    root = tmp_path_factory.mktemp("airflow") / "project"
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()  # kedro wants the source folder; the code is the installed package
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    out = root / "dags"
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1")
    kedro = Path(sys.executable).with_name("kedro")
    proc = subprocess.run(
        [str(kedro), "airflow", "create", "--pipelines", "full", "--group-by", "namespace", "-j", str(TEMPLATE),
         "-e", "ml_latest_small", "-t", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [dag_file] = out.glob("*.py")
    assert dag_file.name == "align3gr_pipelines_ml_latest_small_full_dag.py"
    return dag_file.read_text()


def _tasks(tree: ast.Module) -> dict[str, str]:
    """task_id -> the stage its function runs (`run_stage("<stage>", params)`)."""
    found = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for deco in fn.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "task":
                    [kw] = [k for k in deco.keywords if k.arg == "task_id"]
                    [call] = [c for c in ast.walk(fn) if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "run_stage"]
                    found[kw.value.value] = call.args[0].value
    return found


def _edges(tree: ast.Module) -> set[tuple[str, str]]:
    """(upstream, downstream) for each `tasks["a"] >> tasks["b"]`."""
    return {(op.left.slice.value, op.right.slice.value) for op in ast.walk(tree)
            if isinstance(op, ast.BinOp) and isinstance(op.op, ast.RShift)}


def test_one_task_per_stage_each_running_its_stage(dag_source):
    tasks = _tasks(ast.parse(dag_source))
    assert sorted(tasks) == sorted(STAGES)
    assert all(task == stage for task, stage in tasks.items())


def test_dependencies_follow_the_stage_order(dag_source):
    edges = _edges(ast.parse(dag_source))
    order = {stage: n for n, stage in enumerate(STAGES)}
    assert all(order[up] < order[down] for up, down in edges), sorted(edges)
    # each stage waits for the one before it, so the DAG's only topological order is the stages' order
    assert {(a, b) for a, b in zip(STAGES, STAGES[1:])} <= edges


def test_env_and_runtime_params_reach_every_kedro_session(dag_source):
    tree = ast.parse(dag_source)
    consts = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    assert consts["ENV"] == "ml_latest_small" and consts["PIPELINE"] == "full"
    [dag_call] = [d for n in tree.body if isinstance(n, ast.FunctionDef) for d in n.decorator_list
                  if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "dag"]
    kwargs = {k.arg: k.value for k in dag_call.keywords}
    assert kwargs["dag_id"].value == "align3gr_pipelines_full_ml_latest_small"
    assert ast.unparse(kwargs["params"]) == "{'env': ENV, 'runtime_params': {}}"  # overridable when triggered
    [run_stage] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_stage"]
    [create] = [c for c in ast.walk(run_stage) if isinstance(c, ast.Call) and ast.unparse(c.func) == "KedroSession.create"]
    session = {k.arg: ast.unparse(k.value) for k in create.keywords}
    assert session["env"] == "params.get('env') or ENV"
    assert session["runtime_params"] == "dict(params.get('runtime_params') or {})"
    [run] = [c for c in ast.walk(run_stage) if isinstance(c, ast.Call) and ast.unparse(c.func) == "session.run"]
    assert {k.arg: ast.unparse(k.value) for k in run.keywords} == {"pipeline_names": "[PIPELINE]", "namespaces": "[stage]"}
    # every task hands Airflow's params (the DAG run's, with trigger-time overrides) to run_stage
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name in STAGES:
            assert [a.arg for a in fn.args.args] == ["params"]


def test_each_namespace_is_exactly_its_registered_stage():
    """`--namespaces <stage>` of `full` runs what `kedro run --pipelines <stage>` runs."""
    from align3gr_pipelines.pipeline_registry import register_pipelines

    pipes = register_pipelines()
    for stage in STAGES:
        in_namespace = {n.name for n in pipes["full"].nodes if n.namespace == stage}
        assert in_namespace == {n.name for n in pipes[stage].nodes}, stage
