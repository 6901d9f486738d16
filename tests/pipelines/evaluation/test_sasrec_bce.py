"""The `sasrec_bce` baseline's settings: evaluation.sasrec_bce over tokenization.collaborative_encoder."""
from __future__ import annotations

import pytest

from align3gr_pipelines.evaluation.sasrec_bce import bce_settings, train_sasrec_bce

ENCODER = {"hidden_dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 20, "dropout": 0.1, "epochs": 2, "batch_size": 64,
           "lr": 1e-2, "eval_every": 5}
TOKENIZATION = {"device": "cpu", "num_threads": 1, "collaborative_encoder": ENCODER}


def test_nulls_inherit_the_collaborative_encoder_and_set_keys_win():
    s = bce_settings({"sasrec_bce": {"epochs": 7, "dropout": None, "device": None}}, TOKENIZATION)
    assert s == {"hidden_dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 20, "dropout": 0.1, "epochs": 7, "batch_size": 64,
                 "lr": 1e-2, "weight_decay": 0.0, "device": "cpu", "num_threads": 1}
    assert bce_settings({}, TOKENIZATION)["epochs"] == 2


def test_settings_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"evaluation\.sasrec_bce: unknown key\(s\) \['loss'\]"):
        bce_settings({"sasrec_bce": {"loss": "ce"}}, TOKENIZATION)
    with pytest.raises(KeyError, match="tokenization.collaborative_encoder"):
        bce_settings({}, {"device": "cpu"})


def test_train_sasrec_bce_fits_with_the_given_architecture(tiny_data):
    model, log = train_sasrec_bce(tiny_data["items"]["item_id"].tolist(), tiny_data["train_sequences"],
                                  bce_settings({}, TOKENIZATION), seed=0)
    assert model.config == {"hidden_dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 20, "dropout": 0.1}
    assert not model.training and log["train_seconds"] > 0 and log["settings"]["loss"] == "bce"
    assert len(log["curves"]["sasrec_train_loss"]) == 2
