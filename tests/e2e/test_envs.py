"""The ml_latest_small, instruments and instruments_cpu envs load and resolve as `kedro run --env <env>`
would, and every row of the quality study (benchmarks/study_rows.py) overrides parameters that exist. No
training."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality_study  # noqa: E402
import study_rows  # noqa: E402


@pytest.fixture(scope="module")
def env_params() -> dict[str, dict]:
    return {env: quality_study.load_parameters(env) for env in ("ml_latest_small", "instruments", "instruments_cpu")}


def test_ml_latest_small_env_resolves(env_params):
    p = env_params["ml_latest_small"]
    assert p["data_prep"]["source"] == "movielens"
    assert p["data_prep"]["movielens"]["path"].endswith("ml-latest-small")
    # soft merge: keys the env does not name still come from conf/base
    assert p["data_prep"]["feedback"]["liked_min"] == 4
    assert p["sft_train"]["trainer"]["output_dir"] == "data/ml_latest_small/06_models/sft_train_work"
    assert {"tokenization", "sft_data", "sft_train", "sp_dpo_curriculum", "rf_dpo", "evaluation"} <= set(p)


def test_instruments_env_is_the_papers_setting(env_params, monkeypatch):
    p = env_params["instruments"]
    assert p["data_prep"]["source"] == "lcrec_json" and p["data_prep"]["lcrec_json"]["name"] == "Instruments"
    rq = p["tokenization"]["rq_vae"]
    assert (rq["levels"], rq["codebook_size"], rq["latent_dim"], rq["min_items_per_code"]) == (3, 256, 32, None)
    assert p["sft_train"]["backbone"]["kind"] == "hf" and p["sft_train"]["backbone"]["hf"]["lora"]["r"] > 0
    assert p["evaluation"]["beam_width"] == 20
    assert p["sp_dpo_curriculum"]["n_negatives"] == 20 and p["rf_dpo"]["n_rejected"] == 20
    assert p["sft_train"]["trainer"]["output_dir"].startswith("data/instruments/")
    # the base LM comes from the environment (a local Llama-2-7B on a GPU box)
    monkeypatch.setenv("ALIGN3GR_BASE_LM", "/models/Llama-2-7b-hf")
    monkeypatch.setenv("ALIGN3GR_BASE_LM_GGUF", "")
    hf = quality_study.load_parameters("instruments")["sft_train"]["backbone"]["hf"]
    assert hf["name_or_path"] == "/models/Llama-2-7b-hf" and not hf["gguf_file"]


def test_instruments_cpu_env_is_the_papers_data_at_cpu_sizes(env_params):
    """The paper's Instruments data and SCID shape, item content from LC-Rec's codes (no item text in the
    release), a scratch LM, its own data root."""
    p, gpu = env_params["instruments_cpu"], env_params["instruments"]
    assert p["data_prep"] == gpu["data_prep"]  # the same data as the paper's-setting env
    tok = p["tokenization"]
    assert tok["semantic_encoder"]["item_features"] == "lcrec_codes" and tok["item_scids_from"] == "rq_vae"
    index = Path(tok["semantic_encoder"]["lcrec_index"])
    assert index.name == "Instruments.index.json" and index.parent == Path(p["data_prep"]["lcrec_json"]["path"])
    if (REPO / index).parent.is_dir():  # ../shared/data is outside the repository
        assert (REPO / index).is_file()
    rq = tok["rq_vae"]
    assert (rq["levels"], rq["codebook_size"], rq["latent_dim"], rq["min_items_per_code"]) == (3, 256, 32, None)
    assert tok["num_threads"] == 1 and tok["device"] == "cpu"
    assert p["sft_train"]["backbone"]["kind"] == "scratch"
    assert p["sft_train"]["trainer"]["output_dir"] == "data/instruments_cpu/06_models/sft_train_work"
    assert p["sp_dpo_curriculum"]["n_negatives"] == 20 and p["rf_dpo"]["n_rejected"] == 20
    assert p["sp_dpo_curriculum"]["decoding"]["beam_width"] == 20 and p["evaluation"]["beam_width"] == 20
    # every test user is scored (the paper's protocol)
    assert p["evaluation"]["max_users"]["test"] is None and p["evaluation"]["max_history"] == 20
    # the defaults elsewhere keep text features and RQ-VAE item SCIDs
    for env in ("ml_latest_small", "instruments"):
        assert env_params[env]["tokenization"]["semantic_encoder"]["item_features"] == "text"
        assert env_params[env]["tokenization"]["item_scids_from"] == "rq_vae"


def test_every_study_row_overrides_existing_parameters(env_params):
    study_rows.validate()
    p = env_params["ml_latest_small"]
    for run in study_rows.RUNS.values():
        quality_study.apply_overrides(p, {**study_rows.QUICK_OVERRIDES, **run.overrides})
    assert set(study_rows.QUICK_RUNS) <= set(study_rows.RUNS)
    assert {line.run for line in study_rows.LINES} <= set(study_rows.RUNS)


def test_instruments_cpu_tiger_and_lcrec_rows_use_lcrec_codes_as_item_ids(env_params):
    """On Instruments the paper's TIGER / LC-Rec rows used LC-Rec's released codes as item IDs; so do ours, in
    that env only, and every row still overrides parameters that exist there."""
    p = env_params["instruments_cpu"]
    for run in study_rows.RUNS.values():
        resolved = quality_study.apply_overrides(p, study_rows.overrides_in_env(run, "instruments_cpu"))
        expected = "lcrec_index" if run.name in ("tiger", "lcrec") else "rq_vae"
        assert resolved["tokenization"]["item_scids_from"] == expected
        assert study_rows.overrides_in_env(run, "ml_latest_small") == run.overrides


def test_a_misspelt_override_is_an_error(env_params):
    with pytest.raises(KeyError, match="user_scid"):
        quality_study.apply_overrides(env_params["ml_latest_small"], {"tokenization.ablation.user_scid": False})


def test_ablation_rows_change_their_stage_and_share_the_rest(env_params):
    """Rows that only change DPO share every upstream cache key with the full run (same seed), and an
    ablation changes the key of its stage and every stage after it."""
    study = object.__new__(quality_study.Study)
    study.params, study.env, study.code = env_params["ml_latest_small"], "ml_latest_small", "x"
    study.base_overrides = {}
    full = study.stage_keys(study_rows.RUNS["full"], 42)
    dpo = study.stage_keys(study_rows.RUNS["dpo_random"], 42)
    tok = study.stage_keys(study_rows.RUNS["tok_no_cf"], 42)
    assert all(dpo[s] == full[s] for s in ("data_prep", "tokenization", "sft_data", "sft_train"))
    assert dpo["sp_dpo_curriculum"] != full["sp_dpo_curriculum"]
    assert tok["data_prep"] == full["data_prep"] and tok["tokenization"] != full["tokenization"]
    assert study.stage_keys(study_rows.RUNS["full"], 43)["data_prep"] != full["data_prep"]


def test_tokenization_ablations_share_the_encoders_of_their_seed(env_params):
    """Every row of a seed reuses one semantic-encoder + SASRec run (the tokenization rows only rerun the SC
    tokenizer), a seed does not reuse another seed's, and the encoders' files are picked out of a whole
    tokenization stage by their catalog paths."""
    study = object.__new__(quality_study.Study)
    study.params, study.env, study.code = env_params["ml_latest_small"], "ml_latest_small", "x"
    study.base_overrides, study.conf = {}, REPO / "conf"
    keys = {study._encoders_key(study.overrides(run, 42), 42) for run in study_rows.RUNS.values()}
    assert len(keys) == 1
    assert study._encoders_key(study.overrides(study_rows.RUNS["full"], 43), 43) not in keys
    changed = {**study.overrides(study_rows.RUNS["full"], 42), "tokenization.collaborative_encoder.epochs": 3}
    assert study._encoders_key(changed, 42) not in keys
    stage_files = [
        "ml_latest_small/.lineage/sasrec_model.json", "ml_latest_small/.lineage/sc_tokenizer.json",
        "ml_latest_small/04_feature/item_cf_embeddings.parquet", "ml_latest_small/04_feature/item_sc_embeddings.parquet",
        "ml_latest_small/04_feature/user_semantic_embeddings.parquet", "ml_latest_small/05_model_input/item_scids.parquet",
        "ml_latest_small/06_models/sasrec/model.safetensors", "ml_latest_small/06_models/sc_tokenizer/model.safetensors",
        "ml_latest_small/08_reporting/tokenization/sasrec_log.json", "ml_latest_small/08_reporting/tokenization/metrics.json",
    ]
    assert study._encoder_files(stage_files) == [
        "ml_latest_small/.lineage/sasrec_model.json", "ml_latest_small/04_feature/item_cf_embeddings.parquet",
        "ml_latest_small/04_feature/user_semantic_embeddings.parquet", "ml_latest_small/06_models/sasrec/model.safetensors",
        "ml_latest_small/08_reporting/tokenization/sasrec_log.json",
    ]
    assert set(study._tokenization_nodes()) >= set(quality_study.ENCODER_NODES)


def test_mean_ci_is_a_student_t_interval():
    mean, half = quality_study.mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)
    assert quality_study.mean_ci([0.5])[1] != quality_study.mean_ci([0.5])[1]  # nan for one seed


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out.add(prefix + str(k))
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
    return out


@pytest.mark.parametrize("env", ["ml_latest_small", "instruments", "instruments_cpu"])
def test_env_files_only_override_keys_that_exist_in_base(env):
    """With the soft merge an env key that a stage renamed would be silently ignored; catch it here."""
    import yaml

    def load(folder: Path) -> dict:
        merged: dict = {}
        for path in sorted(folder.glob("parameters*.yml")):
            merged.update(yaml.safe_load(path.read_text()) or {})
        return merged

    base, overrides = _keys(load(REPO / "conf" / "base")), _keys(load(REPO / "conf" / env))
    assert overrides - base == set(), f"conf/{env} names parameters that conf/base does not have"


@pytest.mark.parametrize("env", ["base", "ml_latest_small", "ml_latest_small_gpu", "instruments", "instruments_cpu", "smollm2"])
def test_dpo_prompts_show_as_many_history_items_as_the_sft_prompts(env):
    """SP-DPO and RF-DPO train on prompts shaped like SFT's (and evaluation's seq_eval_prompts). The
    2026-11-30 ml_latest_small study ran SFT at 20 items and both DPO levels at the base's 10."""
    p = quality_study.load_parameters(env)
    n = p["sft_data"]["max_history"]
    assert p["sp_dpo_curriculum"]["prompts"]["max_history"] == n
    assert p["rf_dpo"]["prompts"]["max_history"] == n
