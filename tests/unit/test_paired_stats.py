"""Pooled paired differences over seeds with a user-cluster bootstrap, and the MDE, checked by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from align3gr_pipelines.evaluation.paired_stats import (
    cluster_bootstrap_delta,
    minimal_detectable_effect,
    per_case_metrics,
    pooled_paired_delta,
)


def test_delta_is_the_pooled_mean_and_a_constant_difference_has_a_point_ci():
    a = np.array([0, 1, 0, 1, 0, 0], dtype=float)
    b = a + 0.5
    out = cluster_bootstrap_delta(a, b, np.array(["u1", "u1", "u2", "u2", "u3", "u3"]), n_boot=200)
    assert out.delta == pytest.approx(0.5) and out.ci_low == pytest.approx(0.5) and out.ci_high == pytest.approx(0.5)
    assert out.se == pytest.approx(0.0) and out.mde == pytest.approx(0.0)
    assert (out.n_users, out.n_cases, out.discordant) == (3, 6, 1.0)
    assert out.excludes_zero


def test_the_bootstrap_resamples_users_with_all_their_cases():
    # u1 gains on both of its (seed) cases, u2 loses on both: a case-level bootstrap could draw one case of
    # each; the cluster bootstrap only ever draws whole users, so every resampled mean is a mean of
    # per-user means (+1 or -1, each user having 2 cases) = (#u1 - #u2) / 2.
    a = np.zeros(4)
    b = np.array([1.0, 1.0, -1.0, -1.0])
    out = cluster_bootstrap_delta(a, b, np.array(["u1", "u1", "u2", "u2"]), n_boot=500, seed=3)
    assert out.delta == 0.0
    assert {out.ci_low, out.ci_high} <= {-1.0, 0.0, 1.0}


def test_mde_is_z_sum_times_se_and_matches_the_design_rule_of_thumb():
    assert minimal_detectable_effect(0.01) == pytest.approx((1.959964 + 0.841621) * 0.01, rel=1e-5)
    rng = np.random.default_rng(0)
    n, d = 20000, 0.08  # 8% discordant cases, no true difference
    a = np.zeros(n)
    b = np.zeros(n)
    flip = rng.random(n) < d
    b[flip] = rng.choice([-1.0, 1.0], flip.sum())
    out = cluster_bootstrap_delta(a, b, np.arange(n), n_boot=400, seed=1)
    assert out.mde == pytest.approx(2.8 * np.sqrt(d / n), rel=0.15)
    assert not out.excludes_zero or abs(out.delta) < out.mde


def _cases(seed, values):
    return pd.DataFrame({"seed": seed, "user_id": [str(u) for u in range(len(values))], "case": 0, "recall@10": values})


def test_pooled_over_seeds_pairs_each_seed_with_itself_and_refuses_unpaired_rows():
    a = pd.concat([_cases(42, [0, 0, 1, 0]), _cases(43, [1, 0, 0, 0])])
    b = pd.concat([_cases(42, [1, 0, 1, 0]), _cases(43, [1, 1, 0, 1])])
    out = pooled_paired_delta(a, b, "recall@10", n_boot=100)
    assert out.delta == pytest.approx(3 / 8) and out.n_seeds == 2 and out.n_users == 4 and out.n_cases == 8
    with pytest.raises(ValueError, match="in one table only"):
        pooled_paired_delta(a, b[b["seed"] == 42], "recall@10")
    with pytest.raises(ValueError, match="lacks columns"):
        pooled_paired_delta(a.drop(columns="case"), b, "recall@10")


def test_per_case_metrics_by_hand_with_several_cases_per_user():
    cases = pd.DataFrame({"split": "test", "user_id": ["u", "u", "v"], "case": [3, 4, 2], "target": ["a", "b", "c"]})
    recs = pd.DataFrame({"model": "m", "split": "test", "user_id": ["u", "u", "u", "v"], "case": [3, 3, 4, 2],
                         "rank": [1, 2, 1, 1], "item_id": ["x", "a", "b", "y"], "score": [2.0, 1.0, 1.0, 1.0]})
    out = per_case_metrics(recs, cases, ks=(1, 10)).set_index(["user_id", "case"])
    assert out.loc[("u", 3), "recall@1"] == 0 and out.loc[("u", 3), "recall@10"] == 1
    assert out.loc[("u", 3), "ndcg@10"] == pytest.approx(1 / np.log2(3))
    assert out.loc[("u", 4), "recall@1"] == 1 and out.loc[("v", 2), "recall@10"] == 0
