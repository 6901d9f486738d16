"""sft_train with `objective: tca4rec`: the wiring into the HF Trainer, the pipeline, and the evaluation row."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset

from align3gr_pipelines.cf.sasrec import SASRec, fit_sasrec, training_sequences
from align3gr_pipelines.datasets import CheckpointDataset
from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.pipelines.evaluation.nodes import recommend_with_lm
from align3gr_pipelines.pipelines.sft_train import create_pipeline as sft_train_pipeline
from align3gr_pipelines.sft.prompts import seq_prompt
from align3gr_pipelines.sft.trainer import fit_sft

from .conftest import tiny_train_params

LOAD_CLASS = "align3gr_pipelines.lm.rec_lm.RecLM"


@pytest.fixture(scope="module")
def sasrec(toy) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(toy["items"]["item_id"].tolist(), hidden_dim=16, n_layers=1, n_heads=1, max_len=8, dropout=0.0)
    sequences = list(training_sequences(toy["train_sequences"]).values())
    fit_sasrec(model, sequences, epochs=3, batch_size=32, lr=1e-2, seed=0)
    return model.eval()


def tca_params(tmp_path, alpha: float, **tca) -> dict:
    params = tiny_train_params(tmp_path, max_steps=4, eval_steps=2, torch_threads=1)
    params["objective"] = "tca4rec"
    params["tca4rec"].update(alpha=alpha, **tca)
    return params


def weights(rec: RecLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rec.model.state_dict().items()}


def curve(metrics: dict, name: str) -> list[float]:
    return [v for _, v in metrics["curves"][name]]


def test_alpha_zero_trains_exactly_like_plain_sft(tmp_path, toy, examples, sasrec):
    ce_params = tiny_train_params(tmp_path / "ce", max_steps=4, eval_steps=2, torch_threads=1, logits="all")  # TCA4Rec computes every position's logits
    ce, ce_metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], ce_params, seed=0)
    tca, tca_metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], tca_params(tmp_path / "t0", 0.0),
                               seed=0, cf_model=sasrec)
    assert tca_metrics["info"]["tca4rec"]["n_train_examples"] > 0  # the TCA4Rec path really ran
    # Observed: losses equal to ~1e-7 (summation order) and bit-identical weights; the tolerances only allow
    # for summation order under other thread counts.
    assert curve(tca_metrics, "train_loss") == pytest.approx(curve(ce_metrics, "train_loss"), rel=1e-6)
    assert curve(tca_metrics, "eval_loss") == pytest.approx(curve(ce_metrics, "eval_loss"), rel=1e-6)
    for name, w in weights(ce).items():
        torch.testing.assert_close(weights(tca)[name], w, rtol=1e-6, atol=1e-7, msg=name)

    # α > 0 really changes training (the soft labels reach the Trainer's backward pass). At the random init
    # P_θ is nearly uniform and Σ ỹ·P ≈ P(y), so the first losses barely move: compare the weights.
    soft, _ = fit_sft(examples, toy["item_scids"], toy["user_scids"], tca_params(tmp_path / "t5", 0.5),
                      seed=0, cf_model=sasrec)
    gap = max(float((weights(soft)[k] - w).abs().max()) for k, w in weights(ce).items())
    assert gap > 1e-4


def test_pipeline_with_tca4rec_objective_and_its_evaluation_row(tmp_path, toy, examples, sasrec):
    catalog = DataCatalog(datasets={
        "sft_examples": MemoryDataset(examples),
        "item_scids": MemoryDataset(toy["item_scids"]),
        "user_scids": MemoryDataset(toy["user_scids"]),
        "sasrec_model": MemoryDataset(sasrec, copy_mode="assign"),
        "seq_eval_prompts": MemoryDataset(pd.DataFrame()),  # unused: these params select on eval_loss
        "params:sft_train": MemoryDataset(tca_params(tmp_path / "work", 0.3)),
        "params:seed": MemoryDataset(42),
        "sft_model": CheckpointDataset(path=str(tmp_path / "06_models/sft_model"), load_class=LOAD_CLASS, optional=True),
        "sft_train_metrics": JSONDataset(filepath=str(tmp_path / "metrics.json")),
        "sft_training_curve": MatplotlibDataset(filepath=str(tmp_path / "curve.png")),
    })
    SequentialRunner().run(sft_train_pipeline(), catalog)
    model = catalog.load("sft_model")
    assert model.meta["objective"] == "tca4rec"
    assert model.meta["tca4rec"]["alpha"] == 0.3 and model.meta["tca4rec"]["label"] == "cf"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["info"]["objective"] == "tca4rec" and metrics["curves"]["eval_loss"]

    # evaluation names the row after the objective
    items = toy["item_scids"]
    prompts = pd.DataFrame({"split": "test", "user_id": ["u0", "u1"],
                            "prompt": [seq_prompt(items["tokens"].head(3).tolist(), None),
                                       seq_prompt(items["tokens"].tail(2).tolist(), None)]})
    eval_params = {"beam_width": 4, "top_k": 3, "batch_size": 2, "torch_threads": 1}
    recs, info = recommend_with_lm(model, prompts, items, eval_params, stage="sft_model")
    assert info["model"] == "sft+tca4rec" and set(recs["model"]) == {"sft+tca4rec"}
    model.meta["objective"] = "ce"
    assert recommend_with_lm(model, prompts, items, eval_params, stage="sft_model")[1]["model"] == "sft"


def test_clear_errors_for_missing_cf_model_and_bad_settings(tmp_path, toy, examples, sasrec):
    with pytest.raises(ValueError, match="sasrec_model.*tokenization"):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], tca_params(tmp_path / "a", 0.3), seed=0, cf_model=None)
    params = tca_params(tmp_path / "b", 0.3, positions="everywhere")
    with pytest.raises(ValueError, match="tca4rec.positions"):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, cf_model=sasrec)
    params = tca_params(tmp_path / "c", 0.3)
    params["objective"] = "tca"
    with pytest.raises(ValueError, match="sft_train.objective"):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, cf_model=sasrec)


def test_ablations_run_through_the_trainer_uniform_label_needs_no_cf_model(tmp_path, toy, examples):
    rec, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"],
                           tca_params(tmp_path / "u", 0.3, variant="aux_kl", label="uniform"), seed=0, cf_model=None)
    assert rec.meta["objective"] == "tca4rec"
    assert rec.meta["tca4rec"]["variant"] == "aux_kl" and rec.meta["tca4rec"]["cf_model"] is None
    assert all(torch.isfinite(torch.tensor(curve(metrics, "train_loss"))))
