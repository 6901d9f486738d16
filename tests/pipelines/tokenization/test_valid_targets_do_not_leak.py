"""The valid targets feed only the monitors (SASRec's valid Recall, the U2I AUC), never what is learnt: with
the same training data and seed, changing only the valid targets gives the same SCIDs and CF embeddings,
while the AUC monitor does see the change."""
from __future__ import annotations

import numpy as np
import pandas as pd

from align3gr_pipelines.pipelines.tokenization import nodes

from .conftest import SEED, tiny_params, tokenize


def _other_valid_targets(dataset: dict) -> pd.DataFrame:
    """Each user's valid target replaced by another catalogue item outside the user's history."""
    items = dataset["items"]["item_id"].tolist()
    valid = dataset["valid"].copy()
    rng = np.random.default_rng(0)
    new = []
    for h, t in zip(valid["history"], valid["target"]):
        pool = [i for i in items if i != t and i not in set(h)]
        new.append(pool[int(rng.integers(len(pool)))])
    valid["target"] = new
    assert (valid["target"] != dataset["valid"]["target"]).all()
    return valid


def test_changing_only_valid_targets_leaves_every_scid_unchanged(dataset, features, default_run):
    changed = {**dataset, "valid": _other_valid_targets(dataset)}
    params = tiny_params()
    params["collaborative_encoder"]["eval_every"] = 1  # the SASRec monitor reads the valid targets each epoch
    model_a, log_a = nodes.train_collaborative_encoder(dataset["items"], dataset["train_sequences"], dataset["valid"], params, SEED)
    model_b, log_b = nodes.train_collaborative_encoder(changed["items"], changed["train_sequences"], changed["valid"], params, SEED)
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert (a == b).all(), f"SASRec weights {name} depend on the valid targets"
    assert log_a["curves"]["sasrec_train_loss"] == log_b["curves"]["sasrec_train_loss"]
    assert log_a["curves"]["sasrec_valid_recall_at_10"] != log_b["curves"]["sasrec_valid_recall_at_10"]  # the monitor did read them
    run = tokenize(changed, features, tiny_params())
    pd.testing.assert_frame_equal(run["item_scids"], default_run["item_scids"])
    pd.testing.assert_frame_equal(run["user_scids"], default_run["user_scids"])
    assert run["log"]["scalars"]["phase1_auc"] != default_run["log"]["scalars"]["phase1_auc"]
