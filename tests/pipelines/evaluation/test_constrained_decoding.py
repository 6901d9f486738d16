"""The constrained decoder is exact (wide beam == brute force), never spells a non-catalogue SCID, and its
prefix tables answer the lookups other stages rely on."""
from __future__ import annotations

import pytest
import torch

from align3gr_pipelines.lm.constrained_decoding import (
    SCIDCatalog,
    constrained_beam_search,
    decode_prompts,
    generate_scids,
    item_logprobs,
)
from align3gr_pipelines.lm.rec_lm import RecLM, encode_prompt

from .conftest import make_tokenizer, random_unique_codes, tiny_llama

VOCAB = 48


def skewed_catalogue(seed: int = 3) -> torch.Tensor:
    """Uneven fan-out: one first code holds many items, others one or two (deep and shallow subtrees)."""
    codes = random_unique_codes(30, 3, 4, seed)
    rows = torch.as_tensor(codes) + torch.tensor([10, 20, 30])
    extra = torch.tensor([[15, 20, 30], [15, 21, 30], [16, 20, 34]])
    return torch.cat([rows, extra])


@torch.no_grad()
def brute_force(model, prompt: list[int], rows: torch.Tensor) -> torch.Tensor:
    """Every item's sequence log-prob from a full forward of prompt + SCID (no cache, no padding: all
    rows have the same length), summed over the SCID positions."""
    seqs = torch.cat([torch.tensor(prompt).expand(len(rows), -1), rows], dim=1)
    lp = torch.log_softmax(model(seqs).logits.float(), -1)
    n_levels = rows.shape[1]
    at = lp[:, len(prompt) - 1 : len(prompt) - 1 + n_levels]  # the positions that predict the SCID tokens
    return at.gather(-1, rows.unsqueeze(-1)).squeeze(-1).sum(-1)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(VOCAB, seed=0)
    rows = skewed_catalogue()
    catalog = SCIDCatalog.from_token_ids(rows, [f"it{k}" for k in range(len(rows))])
    prompts = [[2, 5, 6, 7], [2, 8], [2, 9, 3, 4, 5, 6, 7, 8, 9, 1, 5]]  # different lengths → left padding
    return model, rows, catalog, prompts


@torch.no_grad()
@pytest.mark.parametrize("attention", ["tree", "expand"])
def test_full_width_beam_equals_brute_force_ranking(setup, attention):
    model, rows, catalog, prompts = setup
    n = len(rows)
    idx, score = constrained_beam_search(model, prompts, catalog, beam_width=n, top_k=n, batch_size=2, attention=attention)
    for b, prompt in enumerate(prompts):
        truth = brute_force(model, prompt, rows)
        order = torch.argsort(truth, descending=True)
        assert idx[b].tolist() == order.tolist()
        torch.testing.assert_close(score[b], truth[order], atol=1e-4, rtol=0)


@torch.no_grad()
def test_item_logprobs_equal_brute_force(setup):
    model, rows, catalog, prompts = setup
    lp = item_logprobs(model, prompts, catalog, batch_size=2, chunk_size=7)
    for b, prompt in enumerate(prompts):
        torch.testing.assert_close(lp[b], brute_force(model, prompt, rows), atol=1e-4, rtol=0)
    cand = torch.tensor([[3, -1], [0, 5], [7, 7]])
    sub = item_logprobs(model, prompts, catalog, candidates=cand)
    assert sub[0, 1] == float("-inf")
    torch.testing.assert_close(sub[1], lp[1, [0, 5]])


@torch.no_grad()
@pytest.mark.parametrize("beam", [1, 3, 8])
def test_narrow_beams_return_valid_distinct_sorted_items(setup, beam):
    model, rows, catalog, prompts = setup
    idx, score = constrained_beam_search(model, prompts, catalog, beam_width=beam, top_k=beam, batch_size=3)
    same = constrained_beam_search(model, prompts, catalog, beam_width=beam, top_k=beam, batch_size=3, attention="expand")
    assert torch.equal(idx, same[0]), "tree attention and the replicated cache run the same beam search"
    torch.testing.assert_close(score, same[1], atol=1e-4, rtol=0)
    assert (idx >= 0).all(), "0 invalid generations: every slot is a catalogue item"
    for b, prompt in enumerate(prompts):
        assert len(set(idx[b].tolist())) == beam
        assert (score[b][:-1] >= score[b][1:]).all()
        truth = brute_force(model, prompt, rows)
        torch.testing.assert_close(score[b], truth[idx[b]], atol=1e-4, rtol=0)  # scores are the true log-probs
        assert score[b][0] <= truth.max() + 1e-5
    if beam == 1:  # greedy over the trie, checked step by step
        for b, prompt in enumerate(prompts):
            prefix: list[int] = []
            for level in range(3):
                lp = torch.log_softmax(model(torch.tensor([prompt + prefix])).logits[0, -1].float(), -1)
                allowed = {r[level] for r in rows.tolist() if r[:level] == prefix}
                prefix.append(max(allowed, key=lambda t: lp[t].item()))
            assert rows[idx[b, 0]].tolist() == prefix


@torch.no_grad()
def test_batching_and_padding_do_not_change_results(setup):
    model, _, catalog, prompts = setup
    a = constrained_beam_search(model, prompts, catalog, beam_width=5, top_k=5, batch_size=3)
    for b, p in enumerate(prompts):
        one = constrained_beam_search(model, [p], catalog, beam_width=5, top_k=5, batch_size=1)
        assert one[0][0].tolist() == a[0][b].tolist()
        torch.testing.assert_close(one[1][0], a[1][b], atol=1e-4, rtol=0)


@torch.no_grad()
def test_top_k_beyond_catalogue_pads_with_minus_one(setup):
    model, rows, catalog, prompts = setup
    n = len(rows)
    idx, score = constrained_beam_search(model, prompts[:1], catalog, beam_width=4, top_k=n + 5)
    assert sorted(idx[0, :n].tolist()) == list(range(n))
    assert idx[0, n:].tolist() == [-1] * 5 and torch.isinf(score[0, n:]).all()


@torch.no_grad()
def test_peft_model_decodes_exactly(setup):
    peft = pytest.importorskip("peft")
    model, rows, catalog, prompts = setup
    lora = peft.get_peft_model(
        tiny_llama(VOCAB, seed=1), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    n = len(rows)
    idx, score = constrained_beam_search(lora, prompts[:2], catalog, beam_width=n, top_k=5)
    for b in range(2):
        truth = brute_force(lora, prompts[b], rows)
        assert idx[b].tolist() == torch.argsort(truth, descending=True)[:5].tolist()


def test_prefix_tables_match_naive_lookups(setup):
    _, rows, catalog, _ = setup
    lists = rows.tolist()
    for j in range(4):
        prefixes = torch.tensor([r[:j] for r in lists] + [[99] * j], dtype=torch.long).view(len(lists) + 1, j)
        mask = catalog.items_with_prefix(prefixes)
        for p, m in zip(prefixes.tolist(), mask):
            assert m.tolist() == [r[:j] == p for r in lists]
    for j in range(3):  # allowed-next-token mask of each item's prefix node = the naive set
        nodes = catalog.item_prefix_node[:, j]
        dense = catalog.allowed_token_mask(j, nodes, VOCAB)
        for r, d in zip(lists, dense):
            assert set(torch.nonzero(d).flatten().tolist()) == {s[j] for s in lists if s[:j] == r[:j]}
    assert catalog.index_of_tokens(rows).tolist() == list(range(len(rows)))
    assert catalog.index_of_tokens(torch.tensor([[15, 21, 31]])).tolist() == [-1]
    assert not catalog.is_valid(torch.tensor([[15, 21, 31]])).any()


def test_catalogue_validation_and_from_scids():
    with pytest.raises(ValueError, match="duplicate SCID"):
        SCIDCatalog.from_token_ids(torch.tensor([[1, 2], [1, 2]]), ["a", "b"])
    tok = make_tokenizer(["<i0_0>", "<i0_1>", "<i1_0>", "<i1_1>", "<u0_0>", "<u0_1>"])
    import pandas as pd

    items = pd.DataFrame({"id": ["x", "y"], "codes": [[0, 1], [1, 0]], "tokens": ["<i0_0><i1_1>", "<i0_1><i1_0>"]})
    cat = SCIDCatalog.from_scids(items, tok)
    assert cat.item_ids == ["x", "y"]
    assert cat.token_ids.tolist() == [tok.convert_tokens_to_ids(["<i0_0>", "<i1_1>"]), tok.convert_tokens_to_ids(["<i0_1>", "<i1_0>"])]
    users = pd.DataFrame({"id": ["u1", "u2", "u3"], "codes": [[0], [0], [1]], "tokens": ["<u0_0>", "<u0_0>", "<u0_1>"]})
    with pytest.raises(ValueError, match="dedupe"):
        SCIDCatalog.from_scids(users, tok)
    assert SCIDCatalog.from_scids(users, tok, dedupe=True).item_ids == ["<u0_0>", "<u0_1>"]
    with pytest.raises(KeyError, match="not in the tokenizer"):
        SCIDCatalog.from_scids(pd.DataFrame({"id": ["z"], "codes": [[7]], "tokens": ["<i0_7>"]}), tok)


@torch.no_grad()
def test_decode_prompts_on_a_rec_lm(tiny_data):
    tok = tiny_data["tokenizer"]
    lm = RecLM(tiny_llama(len(tok), seed=2), tok, {})
    catalog = SCIDCatalog.from_scids(tiny_data["item_scids"], tok)
    prompts = tiny_data["seq_eval_prompts"]["prompt"].tolist()[:4]
    assert tok.convert_ids_to_tokens(encode_prompt(tok, prompts[0]))[0] == "<s>"
    assert tok.unk_token_id not in encode_prompt(tok, prompts[0])
    idx, score = decode_prompts(lm, prompts, catalog, beam_width=6, top_k=6)
    assert (idx >= 0).all() and torch.isfinite(score).all()
    users = SCIDCatalog.from_scids(tiny_data["user_scids"], tok, dedupe=True)  # B2: generate a user SCID
    uidx, _ = decode_prompts(lm, prompts[:2], users, beam_width=3, top_k=1)
    assert all(users.item_ids[i] in set(tiny_data["user_scids"]["tokens"]) for i in uidx[:, 0].tolist())
    assert generate_scids(lm, prompts[:2], users, beam_width=3) == [users.item_ids[i] for i in uidx[:, 0].tolist()]


@torch.no_grad()
def test_tree_attention_with_eager_attention_kernel(setup):
    _, rows, catalog, prompts = setup
    model = tiny_llama(VOCAB, seed=4)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    idx, score = constrained_beam_search(model, prompts, catalog, beam_width=len(rows), top_k=6, batch_size=3, attention="tree")
    for b, prompt in enumerate(prompts):
        truth = brute_force(model, prompt, rows)
        assert idx[b].tolist() == torch.argsort(truth, descending=True)[:6].tolist()
        torch.testing.assert_close(score[b], truth[idx[b]], atol=1e-4, rtol=0)
