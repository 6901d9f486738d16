"""Parameters are checked against conf/base before anything runs (tracking/param_schema.py and its hook):
every shipped env and every quality-study override passes; unknown keys and wrong types fail with the key,
its stage file, what was expected and the closest valid key."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from align3gr_pipelines import settings
from align3gr_pipelines.tracking.param_schema import (
    RULES,
    SKIP_ENV,
    ParameterCheckError,
    Rule,
    build_schema,
    check_params,
    find_issues,
    nest_dotted,
)
from align3gr_pipelines.tracking.param_validation_hook import ParamValidationHooks, base_sources

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
SHIPPED_ENVS = ("base", "local", "ml_latest_small", "ml_latest_small_gpu", "instruments", "instruments_cpu", "smollm2")

sys.path.insert(0, str(REPO / "benchmarks"))
import study_rows  # noqa: E402


def _loader(env: str, conf: Path = CONF, runtime_params: dict | None = None):
    """The project's config loader as `kedro run --env <env> --params ...` builds it (settings.py)."""
    return settings.CONFIG_LOADER_CLASS(conf_source=str(conf), env=env, runtime_params=runtime_params,
                                        **settings.CONFIG_LOADER_ARGS)


@pytest.fixture(scope="module")
def schema():
    patterns = settings.CONFIG_LOADER_ARGS["config_patterns"]["parameters"]
    return build_schema(_loader("base")["parameters"], base_sources(CONF, "base", patterns))


def _messages(params: dict, schema) -> str:
    with pytest.raises(ParameterCheckError) as err:
        check_params(params, schema)
    return str(err.value)


def test_every_env_in_conf_is_one_of_the_shipped_ones():
    assert {p.name for p in CONF.iterdir() if p.is_dir()} >= set(SHIPPED_ENVS)


@pytest.mark.parametrize("env", sorted({p.name for p in CONF.iterdir() if p.is_dir()} | set(SHIPPED_ENVS)))
def test_every_shipped_env_validates(env, schema):
    issues = find_issues(_loader(env)["parameters"], schema)
    assert not issues, "\n".join(i.describe() for i in issues)


def test_a_typo_names_the_key_its_stage_file_and_the_closest_valid_key(schema):
    text = _messages(nest_dotted({"evaluation.beam_widht": 5}), schema)
    assert "evaluation.beam_widht" in text and "conf/base/parameters_evaluation.yml" in text
    assert "stage evaluation" in text and "unknown key" in text
    assert "closest valid key: evaluation.beam_width" in text


def test_a_misspelt_stage_or_nested_key_gets_the_closest_valid_key_too(schema):
    assert "closest valid key: evaluation (conf/base/parameters_evaluation.yml)" in _messages(
        nest_dotted({"evalution.beam_width": 5}), schema)
    assert "closest valid key: sft_train.trainer.early_stopping.patience" in _messages(
        nest_dotted({"sft_train.trainer.early_stopping.patiense": 2}), schema)
    text = _messages(nest_dotted({"sft_data.tasks.seqq.enabled": True}), schema)
    assert "closest valid key: sft_data.tasks.seq" in text


@pytest.mark.parametrize(("override", "expected"), [
    ({"evaluation.beam_width": "abc"}, "evaluation.beam_width [stage evaluation, conf/base/parameters_evaluation.yml]: "
                                       "expected an integer, got 'abc' (str)"),
    ({"evaluation.beam_width": 2.5}, "expected an integer, got 2.5 (float)"),
    ({"evaluation.beam_width": True}, "expected an integer, got True (bool)"),
    ({"evaluation.reuse_kept_input": 1}, "evaluation.reuse_kept_input [stage evaluation, "
                                         "conf/base/parameters_evaluation.yml]: expected true or false, got 1 (int)"),
    ({"sft_train.trainer.learning_rate": "fast"}, "expected a number, got 'fast' (str)"),
    ({"sft_train.trainer.learning_rate": False}, "expected a number, got False (bool)"),
    ({"data_prep.source": 3}, "expected a string, got 3 (int)"),
    ({"evaluation.ks": [5, "ten"]}, "evaluation.ks[1] [stage evaluation, conf/base/parameters_evaluation.yml]: "
                                    "expected an integer, got 'ten' (str)"),
    ({"evaluation.ks": 5}, "expected a list of integers, got 5 (int)"),
    ({"evaluation.baselines": True}, "evaluation.baselines [stage evaluation, conf/base/parameters_evaluation.yml]: "
                                     "expected a mapping (keys: most_popular, sasrec, item_knn), got True (bool)"),
    ({"seed": "42"}, "seed [conf/base/parameters.yml]: expected an integer, got '42' (str)"),
])
def test_a_wrong_type_fails_with_what_was_expected(override, expected, schema):
    assert expected in _messages(nest_dotted(override), schema)


def test_several_problems_are_reported_together(schema):
    params = nest_dotted({"data_prep.bogus_key": 1, "evaluation.beam_width": "abc", "rf_dpo.n_rejectd": 3})
    issues = find_issues(params, schema)
    assert sorted(i.path for i in issues) == ["data_prep.bogus_key", "evaluation.beam_width", "rf_dpo.n_rejectd"]
    text = _messages(params, schema)
    assert text.startswith("3 parameter problems") and SKIP_ENV in text


@pytest.mark.parametrize("override", [
    {"evaluation.beam_width": 5},
    {"sft_train.trainer.learning_rate": 1},  # an int where base has a float
    {"sft_train.trainer.learning_rate": 2.0e-4, "sft_train.backbone.kind": "hf"},
    {"evaluation.max_users": {"test": None, "valid": None}},
    {"evaluation.max_users": None},  # a documented alternative (RULES)
    {"evaluation.torch_threads": None},
    {"sft_train.trainer.torch_threads": 2},
    {"sft_train.trainer.bf16": False},
    {"sft_train.trainer.max_steps": 6},  # null in base: anything
    {"rf_dpo.sentiment.label_to_level": {"LABEL_0": "disliked", "LABEL_2": "liked"}},
    {"sp_dpo_curriculum.mining.similarity_bands": [[0, 0.5], [0.5, 1]]},
])
def test_a_valid_override_passes(override, schema):
    assert find_issues(nest_dotted(override), schema) == []


def test_runtime_params_as_kedro_merges_them_pass_and_fail_as_expected(schema):
    """`--params evaluation.beam_width=5`: Kedro parses the dot list with OmegaConf and the config loader
    merges it over conf/base + the env."""
    good = OmegaConf.to_container(OmegaConf.from_dotlist(["evaluation.beam_width=5", "sft_train.trainer.bf16=true",
                                                          "sft_train.trainer.learning_rate=2e-4"]))
    merged = _loader("ml_latest_small", runtime_params=good)["parameters"]
    assert merged["evaluation"]["beam_width"] == 5 and find_issues(merged, schema) == []
    bad = OmegaConf.to_container(OmegaConf.from_dotlist(["evaluation.beam_widht=5", "evaluation.top_k=ten"]))
    text = _messages(_loader("ml_latest_small", runtime_params=bad)["parameters"], schema)
    assert "closest valid key: evaluation.beam_width" in text and "evaluation.top_k" in text


def test_every_quality_study_override_exists_in_the_schema_with_its_type(schema):
    groups = {"QUICK_OVERRIDES": study_rows.QUICK_OVERRIDES}
    groups.update({f"RUNS[{name}]": run.overrides for name, run in study_rows.RUNS.items()})
    groups.update({f"ENV_OVERRIDES[{env}][{name}]": extra
                   for env, by_run in study_rows.ENV_OVERRIDES.items() for name, extra in by_run.items()})
    assert len(groups) > 10
    for group, overrides in groups.items():
        issues = find_issues(nest_dotted(overrides), schema)
        assert not issues, f"{group}: " + "; ".join(i.describe() for i in issues)


def test_the_schema_follows_base_new_keys_need_no_edit():
    base = {"stage": {"n": 3, "rate": 0.5, "name": "x", "on": True, "opt": None, "ids": [1, 2],
                      "bands": [[0.0, 1.0]], "mixed": [1, "a"], "inner": {"k": 1}}}
    schema = build_schema(base, {"stage": "conf/base/parameters_stage.yml"}, rules={})
    ok = {"stage": {"n": 4, "rate": 1, "name": "y", "on": False, "opt": {"any": "thing"}, "ids": [],
                    "bands": [[0, 0.3]], "mixed": [None, 2.0], "inner": {"k": 2}}}
    assert find_issues(ok, schema) == []
    bad = {"stage": {"n": 1.0, "on": "yes", "ids": [1.5], "inner": {"kk": 1}, "new": 1}}
    assert {i.path: i.unknown for i in find_issues(bad, schema)} == {
        "stage.n": False, "stage.on": False, "stage.ids[0]": False, "stage.inner.kk": True, "stage.new": True}
    grown = build_schema({"stage": {**base["stage"], "new": 0}}, rules={})
    assert find_issues({"stage": {"new": 5}}, grown) == []


def test_rules_open_a_map_add_an_alternative_type_or_declare_a_key():
    base = {"s": {"labels": {"a": 1}, "threads": 1, "x": 1}}
    rules = {"s.labels": Rule("user-named keys", open=True), "s.threads": Rule("null documented", also=(None,)),
             "s.extra": Rule("read with a default", also=(float,))}
    schema = build_schema(base, rules=rules)
    assert find_issues({"s": {"labels": {"b": "anything"}, "threads": None, "extra": 2}}, schema) == []
    assert {i.path for i in find_issues({"s": {"labels": {"a": "x"}, "threads": "2", "extra": "e", "x": None}},
                                        schema)} == {"s.labels.a", "s.threads", "s.extra", "s.x"}


def test_every_rule_names_a_key_of_conf_base_or_a_mapping_there_and_says_why():
    base = _loader("base")["parameters"]

    def lookup(path: str):
        node = base
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return KeyError
            node = node[part]
        return node

    for path, rule in RULES.items():
        assert rule.why.strip(), path
        assert rule.open or rule.also, f"{path}: a rule must open a map or add a type"
        parent = path.rsplit(".", 1)[0]
        assert isinstance(lookup(parent), dict), f"RULES[{path!r}]: {parent} is not a mapping in conf/base"
        if rule.open:
            assert lookup(path) is None or isinstance(lookup(path), dict), path


def _hook_run(conf: Path, env: str, runtime_params: dict | None = None) -> None:
    hooks = ParamValidationHooks()
    hooks.after_context_created(SimpleNamespace(config_loader=_loader(env, conf, runtime_params)))
    hooks.before_pipeline_run(run_params={"env": env}, pipeline=None, catalog=None)


def test_the_hook_stops_a_run_with_a_typo_and_the_env_var_switches_it_off(monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)
    _hook_run(CONF, "ml_latest_small", {"evaluation": {"beam_width": 5}})
    with pytest.raises(ParameterCheckError, match=r"evaluation\.beam_widht.*closest valid key: evaluation\.beam_width"):
        _hook_run(CONF, "ml_latest_small", {"evaluation": {"beam_widht": 5}})
    monkeypatch.setenv(SKIP_ENV, "1")
    _hook_run(CONF, "ml_latest_small", {"evaluation": {"beam_widht": 5}})


def test_the_hook_reports_an_env_file_typo_with_its_stage(tmp_path, monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)
    conf = tmp_path / "conf"
    (conf / "base").mkdir(parents=True)
    for name in ("parameters.yml", "parameters_data_prep.yml", "globals.yml"):
        shutil.copy(CONF / "base" / name, conf / "base" / name)
    (conf / "typo").mkdir()
    (conf / "typo" / "parameters_data_prep.yml").write_text(yaml.safe_dump({"data_prep": {"min_interaction": 2}}))
    with pytest.raises(ParameterCheckError) as err:
        _hook_run(conf, "typo")
    assert ("data_prep.min_interaction [stage data_prep, conf/base/parameters_data_prep.yml]: unknown key"
            in str(err.value)) and "closest valid key: data_prep.min_interactions" in str(err.value)


@pytest.mark.timeout(120)
def test_kedro_run_with_a_typo_in_params_exits_before_any_node_runs(tmp_path):
    """The real CLI on a copy of the project's conf (~15 s on a busy 2-core machine, mostly imports)."""
    shutil.copytree(CONF, tmp_path / "conf")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "src").mkdir()  # the package is installed; Kedro only wants the folder
    # A file store: kedro-mlflow sets its tracking up before the check, and a new SQLite store costs ~7 s.
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "COLUMNS": "200"}
    env.pop(SKIP_ENV, None)
    kedro = Path(sys.executable).with_name("kedro")
    done = subprocess.run([str(kedro), "run", "--pipelines=data_prep",
                           "--params", "data_prep.bogus_key=1,data_prep.min_interaction=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110)
    out = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert done.returncode != 0, out[-2000:]
    assert "ParameterCheckError: 2 parameter problems" in out, out[-2000:]
    assert "data_prep.bogus_key [stage data_prep, conf/base/parameters_data_prep.yml]: unknown key" in out
    assert "closest valid key: data_prep.min_interactions" in out
    assert "Running node" not in out and not (tmp_path / "data").exists()
    # kedro-mlflow created its experiment (after_context_created) but opened no run: the check came first.
    runs = [p for p in (tmp_path / "mlruns").glob("*/*") if p.is_dir()]
    assert (tmp_path / "mlruns").is_dir() and runs == [], runs
