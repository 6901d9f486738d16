"""A DPO stage whose selection kept its input policy is not decoded again: its rows are its input's,
relabelled, and the run info and Markdown say so; a stage that moved away from its input is decoded."""
from __future__ import annotations

import pandas as pd
import pytest

from align3gr_pipelines.evaluation.stage_reuse import kept_input_policy, reuse_input_rows
from align3gr_pipelines.evaluation.timing import insert_section, timing_markdown
from align3gr_pipelines.pipelines.evaluation import nodes

from .conftest import make_rec_lm

PARAMS = {"splits": ["test"], "max_users": None, "max_history": 20, "template_id": 0, "top_k": 20, "beam_width": 20,
          "batch_size": 16, "show_progress": False}


def dpo_meta(stage: str, reference: str, policy: str, selected_step: int) -> dict:
    return {"stage": stage, "dpo": {"stage": stage, "reference_fingerprint": reference, "policy_fingerprint": policy,
                                    "selected_step": selected_step}}


@pytest.mark.parametrize("meta, kept", [
    (dpo_meta("sp_dpo_easy", "a", "a", 0), True),
    (dpo_meta("sp_dpo_easy", "a", "b", 5), False),
    (dpo_meta("sp_dpo_easy", "a", "a", 5), True),  # the weights decide: equal fingerprints are the input policy
    ({"stage": "sp_dpo_easy", "dpo": {"stage": "sp_dpo_easy", "selected_step": 0}}, True),  # no fingerprints: step 0
    ({"stage": "sp_dpo_easy", "dpo": {"stage": "sp_dpo_easy", "selected_step": 3}}, False),
    ({**dpo_meta("sp_dpo_easy", "a", "a", 0), "stage": "sp_dpo_medium"}, False),  # an inherited dpo block
    ({**dpo_meta("sp_dpo_easy", "a", "a", 0), "skipped": True}, False),  # pass-throughs are left out instead
    ({"stage": "sft"}, False),
])
def test_kept_input_policy(meta, kept):
    assert kept_input_policy(meta) is kept


class DecoderSpy:
    """Wraps the real constrained beam search and counts its calls."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    spy = DecoderSpy(nodes.constrained_beam_search)
    monkeypatch.setattr(nodes, "constrained_beam_search", spy)
    return spy


@pytest.fixture(scope="module")
def prompts(tiny_data):
    cases = nodes.build_eval_cases(tiny_data["valid"], tiny_data["test"], PARAMS, seed=0)
    return nodes.build_eval_prompts(cases, tiny_data["seq_eval_prompts"], tiny_data["item_scids"], tiny_data["user_scids"], PARAMS)


def test_a_stage_that_kept_its_input_reuses_its_rows_without_decoding(tiny_data, prompts, spy):
    tok = tiny_data["tokenizer"]
    sft = nodes.recommend_with_lm(make_rec_lm(tok, 1, "sft"), prompts, tiny_data["item_scids"], PARAMS, stage="sft_model")
    assert spy.calls == 1
    # different weights on purpose: equal rows can then only come from reuse
    kept_lm = make_rec_lm(tok, 2, "sp_dpo_easy", dpo=dpo_meta("sp_dpo_easy", "f-sft", "f-sft", 0)["dpo"])
    kept = nodes.recommend_with_lm(kept_lm, prompts, tiny_data["item_scids"], PARAMS, stage="sp_dpo_model_easy")
    assert spy.calls == 1, "a stage that kept its input policy must not be decoded"
    assert len(kept[0]) == 0 and kept[1]["reuse_input"] and kept[1]["decoded"] is False
    moved_lm = make_rec_lm(tok, 3, "sp_dpo_medium", dpo=dpo_meta("sp_dpo_medium", "f-sft", "f-medium", 7)["dpo"])
    moved = nodes.recommend_with_lm(moved_lm, prompts, tiny_data["item_scids"], PARAMS, stage="sp_dpo_model_medium")
    assert spy.calls == 2 and moved[1]["decoded"] is True and len(moved[0]) == len(sft[0])

    recs, info = nodes.combine_recommendations(*sft, *kept, *moved)
    by_model = {m: part.drop(columns="model").reset_index(drop=True) for m, part in recs.groupby("model")}
    pd.testing.assert_frame_equal(by_model["sp_dpo_easy"], by_model["sft"])
    assert not by_model["sp_dpo_medium"].equals(by_model["sft"])
    reused = {m["model"]: m for m in info["models"]}["sp_dpo_easy"]
    assert reused["reused_from"] == "sft" and reused["note"] == "reused from sft: selection kept the input policy"
    assert spy.calls == 2
    # the Markdown's timing table says where the rows came from and what each decode cost
    md = timing_markdown(info["models"])
    assert "| sp_dpo_easy | – | – | reused from sft: selection kept the input policy |" in md
    assert f"| sp_dpo_medium | {moved[1]['seconds']:.1f} | {moved[1]['ms_per_user']:.1f} |" in md


def test_reuse_can_be_switched_off(tiny_data, prompts, spy):
    lm = make_rec_lm(tiny_data["tokenizer"], 2, "sp_dpo_easy", dpo=dpo_meta("sp_dpo_easy", "f", "f", 0)["dpo"])
    recs, info = nodes.recommend_with_lm(lm, prompts, tiny_data["item_scids"], {**PARAMS, "reuse_kept_input": False},
                                         stage="sp_dpo_model_easy")
    assert spy.calls == 1 and len(recs) and info["decoded"] is True


def _part(model: str, **info) -> tuple[pd.DataFrame, dict]:
    rows = pd.DataFrame({"model": model, "split": "test", "user_id": ["u1"], "rank": [1], "item_id": [f"{model}-item"], "score": [0.0]})
    return (rows.iloc[:0] if info.get("skipped") or info.get("reuse_input") else rows), {"model": model, "kind": "lm", **info}


def test_reuse_looks_through_pass_throughs_and_fails_without_an_input():
    parts = [_part("sft"), _part("easy", skipped="meta.skipped", pass_through=True), _part("medium", reuse_input=True, stage="m")]
    out = reuse_input_rows(parts)
    assert out[2][0]["item_id"].tolist() == ["sft-item"] and out[2][0]["model"].tolist() == ["medium"]
    assert out[2][1]["reused_from"] == "sft"
    chained = reuse_input_rows(parts + [_part("hard", reuse_input=True, stage="h")])  # a kept stage after a kept one
    assert chained[3][1]["reused_from"] == "medium" and chained[3][0]["item_id"].tolist() == ["sft-item"]
    missing = [_part("sft", skipped="sft_model checkpoint not found"), _part("easy", reuse_input=True, stage="sp_dpo_model_easy")]
    with pytest.raises(ValueError, match=r"easy \(sp_dpo_model_easy\) kept its input policy.*reuse_kept_input"):
        reuse_input_rows(missing)


def test_timing_section_goes_before_the_ties_and_skipped_sections():
    md = "# Evaluation\n\n## test (2 users)\n\n| a |\n\n## Skipped\n\n- x: y\n"
    out = insert_section(md, "## Time per model\n\n| t |\n")
    assert out == "# Evaluation\n\n## test (2 users)\n\n| a |\n\n## Time per model\n\n| t |\n\n## Skipped\n\n- x: y\n"
    assert insert_section("# E\n", "## T\n") == "# E\n\n## T\n"
    assert insert_section(md, "") == md
