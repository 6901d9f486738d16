"""The SASRec collaborative encoder / baseline: contract interface, training data, persistence."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from align3gr_pipelines.cf.sasrec import SASRec, fit_sasrec, recall_ndcg, training_sequences


def test_training_sequences_rebuild_truncated_histories():
    df = pd.DataFrame({
        "user_id": ["u", "u", "u", "v"],
        "history": [["a"], ["a", "b"], ["b", "c"], ["x"]],  # the third row's history is truncated to 2
        "target": ["b", "c", "d", "y"],
        "position": [1, 2, 3, 1],
    })
    assert training_sequences(df) == {"u": ["a", "b", "c", "d"], "v": ["x", "y"]}


def test_training_sequences_reject_inconsistent_rows():
    df = pd.DataFrame({"user_id": ["u", "u"], "history": [["a"], ["z"]], "target": ["b", "c"], "position": [1, 2]})
    with pytest.raises(ValueError, match="two different items at position 1"):
        training_sequences(df)
    with pytest.raises(ValueError, match="position"):
        training_sequences(df.drop(columns="position"))


def test_score_contract_unknown_ids_and_empty_histories():
    model = SASRec(["a", "b", "c"], hidden_dim=8, max_len=4).eval()
    logits = model.score([["a", "b"], ["a", "zzz", "b"], ["zzz"], []])
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    assert torch.allclose(logits[0], logits[1])  # unknown ids are ignored
    assert torch.equal(logits[2], torch.zeros(3)) and torch.equal(logits[3], torch.zeros(3))
    # only the last max_len items count
    assert torch.allclose(model.score([["c"] * 10 + ["a", "b", "a", "b"]]), model.score([["a", "b", "a", "b"]]))


def test_padding_does_not_change_a_history_s_logits():
    model = SASRec(["a", "b", "c"], hidden_dim=8, max_len=6).eval()
    alone = model.score([["a", "b"]])
    batched = model.score([["a", "b"], ["c", "a", "b", "c", "a"]])[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_training_learns_a_deterministic_cycle_and_round_trips(tmp_path):
    items = [f"i{k}" for k in range(8)]
    cycle = [items[k % 8] for k in range(30)]
    sequences = [cycle[s : s + 12] for s in range(8)]
    torch.manual_seed(0)
    model = SASRec(items, hidden_dim=16, max_len=6, dropout=0.0)
    log = fit_sasrec(model, sequences, epochs=40, batch_size=8, lr=5e-3, seed=0)
    assert log["curves"]["sasrec_train_loss"][-1][1] < 0.5 * log["curves"]["sasrec_train_loss"][0][1]
    metrics = recall_ndcg(model, [["i1", "i2", "i3"], ["i5", "i6"]], ["i4", "i7"], k=1)
    assert metrics["recall_at_1"] == 1.0

    model.save_pretrained(tmp_path / "sasrec")
    loaded = SASRec.from_pretrained(tmp_path / "sasrec")
    assert loaded.item_ids == items
    h = [["i1", "i2"], ["i7"]]
    assert torch.equal(model.score(h), loaded.score(h))
