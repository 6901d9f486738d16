"""sft_train with `tca4rec.positions: all_labelled`: TCA4Rec on every labelled history SCID, in the Trainer."""
from __future__ import annotations

import pytest
import torch

from align3gr_pipelines.cf.sasrec import SASRec, fit_sasrec, training_sequences
from align3gr_pipelines.sft.trainer import fit_sft

from .conftest import tiny_train_params


@pytest.fixture(scope="module")
def sasrec(toy) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(toy["items"]["item_id"].tolist(), hidden_dim=16, n_layers=1, n_heads=1, max_len=8, dropout=0.0)
    fit_sasrec(model, list(training_sequences(toy["train_sequences"]).values()), epochs=3, batch_size=32, lr=1e-2, seed=0)
    return model.eval()


def tca_params(tmp_path, alpha: float, positions: str, **trainer) -> dict:
    params = tiny_train_params(tmp_path, **{"max_steps": 3, "eval_steps": 3, "torch_threads": 1, **trainer})
    params["objective"] = "tca4rec"
    params["tca4rec"].update(alpha=alpha, positions=positions)
    return params


def weights(rec) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rec.model.state_dict().items()}


def test_all_labelled_trains_history_positions_and_alpha_zero_is_the_response_objective(tmp_path, toy, examples, sasrec):
    def run(name: str, alpha: float, positions: str):
        return fit_sft(examples, toy["item_scids"], toy["user_scids"], tca_params(tmp_path / name, alpha, positions),
                       seed=0, cf_model=sasrec)

    resp0, m_resp0 = run("r0", 0.0, "response")
    full0, m_full0 = run("a0", 0.0, "all_labelled")
    # α = 0: one-hot labels at every position, so the same updates to the bit as the response objective
    assert [v for _, v in m_full0["curves"]["train_loss"]] == [v for _, v in m_resp0["curves"]["train_loss"]]
    for name, w in weights(resp0).items():
        assert torch.equal(weights(full0)[name], w), name

    info = m_full0["info"]["tca4rec"]
    assert info["positions"] == "all_labelled" and info["n_history_scids"] > 0
    cov = info["coverage"]
    assert cov["covered"] == ["seq_response", "labelled_history_t>=1"] and cov["micro_batches"] == 3
    assert cov["mean_history_scids_per_micro_batch"] > cov["mean_response_scids_per_micro_batch"] > 0
    assert m_full0["scalars"]["tca4rec_scids_per_micro_batch"] == pytest.approx(cov["mean_scids_per_micro_batch"])
    resp_cov = m_resp0["info"]["tca4rec"]["coverage"]
    assert resp_cov["covered"] == ["seq_response"] and resp_cov["history"] == 0

    # α > 0 at every position trains differently from α > 0 at the response only
    resp3, _ = run("r3", 0.3, "response")
    full3, m_full3 = run("a3", 0.3, "all_labelled")
    gap = max(float((weights(full3)[k] - w).abs().max()) for k, w in weights(resp3).items())
    assert gap > 1e-5
    assert full3.meta["tca4rec"]["positions"] == "all_labelled"
    assert all(torch.isfinite(torch.tensor([v for _, v in m_full3["curves"]["train_loss"]])))


def test_uniform_control_at_every_position_and_history_loss_required(tmp_path, toy, examples):
    params = tca_params(tmp_path / "u", 0.3, "all_labelled")
    params["tca4rec"]["label"] = "uniform"
    rec, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, cf_model=None)
    assert metrics["info"]["tca4rec"]["coverage"]["history"] > 0
    assert rec.meta["tca4rec"]["label"] == "uniform" and rec.meta["tca4rec"]["cf_model"] is None

    params = tca_params(tmp_path / "h", 0.3, "all_labelled", history_loss=False)
    with pytest.raises(ValueError, match="history_loss"):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, cf_model=None)


@pytest.mark.slow  # ~45 s on a busy 2-core machine: two ranks each import the Trainer stack
def test_all_labelled_under_torchrun_two_cpu_processes(tmp_path, toy, examples, sasrec):
    """The objective, its tables and the frozen SASRec reach the torchrun ranks (gloo on CPU)."""
    params = tca_params(tmp_path / "ddp", 0.3, "all_labelled", max_steps=2, eval_steps=2, nproc_per_node=2,
                        launch_timeout_s=300)
    rec, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, cf_model=sasrec)
    assert metrics["info"]["world_size"] == 2 and metrics["scalars"]["global_step"] == 2
    cov = metrics["info"]["tca4rec"]["coverage"]  # rank 0's micro-batches
    assert cov["micro_batches"] == 2 and cov["history"] > 0 and cov["response"] > 0
    assert rec.meta["tca4rec"]["positions"] == "all_labelled"
