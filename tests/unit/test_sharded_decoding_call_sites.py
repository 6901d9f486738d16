"""The call sites of lm/sharded_decoding (valid recall, evaluation, inference, self-play mining): the process
count reaches the decoder under each stage's parameter, its lists are used as one process's, and 1 keeps
today's path. The decoder is a spy (no launch); the launch itself is tested in test_sharded_decoding.py."""
from __future__ import annotations

import numpy as np
import pandas as pd

from align3gr_pipelines.evaluation import valid_recall
from align3gr_pipelines.lm import sharded_decoding as sd
from align3gr_pipelines.lm.constrained_decoding import decode_prompts
from align3gr_pipelines.pipelines.evaluation import nodes
from align3gr_pipelines.preference import self_play
from align3gr_pipelines.serving import recommend
from tests.pipelines.evaluation.conftest import make_dataset, make_rec_lm

N_PROMPTS = 7


class ShardedSpy:
    """Stands in for `decode_prompts_sharded` (no launch: `decode_prompts`) and records how it was called."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, rec_lm, prompts, catalog, *, nproc=1, timeout_s=None, threads=None, work_dir=None,
                 where="sharded decoding", **kwargs):
        self.calls.append({"nproc": nproc, "timeout_s": timeout_s, "threads": threads, "where": where})
        return decode_prompts(rec_lm, prompts, catalog, **kwargs)


def test_call_sites_pass_the_process_count_and_keep_one_process_lists(monkeypatch):
    data = make_dataset(n_users=8, n_items=30)
    rec = make_rec_lm(data["tokenizer"], seed=0, stage="sft")
    spy = ShardedSpy()
    for module in (valid_recall, nodes, recommend, sd):  # sd: self_play imports it inside decode_candidates
        monkeypatch.setattr(module, "decode_prompts_sharded", spy)

    sample = valid_recall.build_valid_sample(valid_recall.sample_valid_prompts(data["seq_eval_prompts"], 5, 0),
                                             data["item_scids"], rec.tokenizer)
    one = valid_recall.decode_top_k(rec, sample, k=5, beam_width=6, batch_size=2)
    assert np.array_equal(valid_recall.decode_top_k(rec, sample, k=5, beam_width=6, batch_size=2, nproc=2, timeout_s=9), one)
    assert spy.calls[-1] == {"nproc": 2, "timeout_s": 9, "threads": None, "where": "valid recall"}

    item_ids = [str(i) for i in data["item_scids"]["id"]]
    args = (rec, sample.prompts, data["item_scids"], item_ids, 6, 5, 2, False)
    assert np.array_equal(self_play.decode_candidates(*args, nproc=2, timeout_s=9), self_play.decode_candidates(*args))
    assert spy.calls[-2]["nproc"] == 2 and spy.calls[-2]["where"] == "sp_dpo_curriculum.decoding"

    params = {"splits": ["test"], "max_users": None, "max_history": 20, "template_id": 0, "top_k": 5, "beam_width": 6,
              "batch_size": 2, "show_progress": False, "torch_threads": 1}
    cases = nodes.build_eval_cases(data["valid"], data["test"], params, seed=0)
    prompts = nodes.build_eval_prompts(cases, data["seq_eval_prompts"], data["item_scids"], data["user_scids"], params).head(N_PROMPTS)
    n_calls = len(spy.calls)
    recs, info = nodes.recommend_with_lm(rec, prompts, data["item_scids"], params, stage="sft_model")
    assert len(spy.calls) == n_calls and "decoding_nproc" not in info  # nproc 1: today's in-process search
    sharded = {**params, "decoding": {"nproc_per_node": 2, "launch_timeout_s": 30}}
    recs2, info2 = nodes.recommend_with_lm(rec, prompts, data["item_scids"], sharded, stage="sft_model")
    assert spy.calls[-1] == {"nproc": 2, "timeout_s": 30, "threads": 1, "where": "evaluation.decoding"}
    assert info2["decoding_nproc"] == 2
    pd.testing.assert_frame_equal(recs, recs2)

    settings = recommend.PromptSettings(max_history=5)
    base = recommend.Recommender(rec, data["item_scids"], None, data["user_scids"], settings, beam_width=6, batch_size=2)
    wide = recommend.Recommender(rec, data["item_scids"], None, data["user_scids"], settings, beam_width=6, batch_size=2,
                                 decoding_nproc=2, decoding_timeout_s=9)
    request = [{"history": item_ids[:3], "user_id": "u1", "k": 4}]
    lists = wide.recommend_many(request)
    assert spy.calls[-1] == {"nproc": 2, "timeout_s": 9, "threads": None, "where": "inference.decoding"}
    assert lists == base.recommend_many(request) and wide.settings() == base.settings()
    built: dict = {}
    monkeypatch.setattr(recommend, "resolve_checkpoint", lambda *a: ("sft", "ckpt"))
    monkeypatch.setattr(recommend.Recommender, "from_checkpoint", classmethod(lambda cls, *a, **k: built.update(k)))
    inference = {"models_dir": "m", "beam_width": 6, "batch_size": 2, "decoding": {"nproc_per_node": 2, "launch_timeout_s": 9}}
    recommend.build_recommender(data["item_scids"], None, None, {"max_history": 5}, inference)
    assert built["decoding_nproc"] == 2 and built["decoding_timeout_s"] == 9
    built.clear()
    recommend.build_recommender(data["item_scids"], None, None, {"max_history": 5}, {**inference, "decoding": {"nproc_per_node": 1}})
    assert built and "decoding_nproc" not in built  # 1: the Recommender exactly as before
