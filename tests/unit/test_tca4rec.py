"""TCA4Rec: the collaborative tokenizer, soft labels and losses (align3gr_pipelines.sft.tca4rec)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from align3gr_pipelines.sft.prompts import seq_prompt
from align3gr_pipelines.sft.tca4rec import (
    TCA4Rec,
    align_cf_logits,
    cf_index_map,
    collaborative_distribution,
    history_from_prompt,
    level_kl,
    soft_labels,
    soft_ntp_loss,
    tca4rec_causal_lm_loss,
    uniform_distribution,
    valid_next_codes,
)
from align3gr_pipelines.tokenizer.scid import codes_to_tokens, vocabulary

# 4 items, 2 levels, V = 3: item0 (0,0), item1 (0,1), item2 (1,0), item3 (1,2)
HAND_CODES = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 2]])
HAND_Z = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # softmax over all items = .1 .2 .3 .4


def random_table(n_items: int, levels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.unique(torch.randint(0, size, (n_items * 3, levels), generator=g), dim=0)
    return rows[torch.randperm(rows.shape[0], generator=g)[:n_items]]


def test_hand_computed_four_items_two_levels():
    y = torch.tensor([[1, 2], [0, 0]])
    p = collaborative_distribution(HAND_Z.expand(2, 4), HAND_CODES, y)
    expected = torch.tensor(
        [
            [[0.3, 0.7, 0.0], [3 / 7, 0.0, 4 / 7]],  # y=(1,2): level 1 over items 2,3 only
            [[0.3, 0.7, 0.0], [1 / 3, 2 / 3, 0.0]],  # y=(0,0): level 1 over items 0,1 only
        ]
    )
    torch.testing.assert_close(p, expected)
    labels = soft_labels(y, p, alpha=0.5)
    torch.testing.assert_close(labels[0], torch.tensor([[0.15, 0.85, 0.0], [3 / 14, 0.0, 0.5 + 2 / 7]]))
    torch.testing.assert_close(soft_labels(y, p, alpha=0.0), F.one_hot(y, 3).float())


def test_distribution_sums_to_one_on_valid_codes_for_every_prefix():
    codes = random_table(60, 3, 4, seed=0)
    z = torch.randn(codes.shape[0], codes.shape[0], generator=torch.Generator().manual_seed(1)) * 3
    z[:, ::7] = float("-inf")  # items the CF model does not know never get mass
    y = codes  # one example per item: every prefix of the trie appears
    n = codes.shape[0]
    p = collaborative_distribution(z, codes, y, codebook_size=5)  # V larger than any used code
    assert p.shape == (n, 3, 5)
    valid = valid_next_codes(codes, y, 5)
    for b in range(n):
        for j in range(3):
            in_prefix = (codes[:, :j] == y[b, :j]).all(dim=1)
            known = in_prefix & torch.isfinite(z[b])
            brute = torch.zeros(5)
            if known.any():
                w = torch.softmax(z[b][known], dim=0)
                brute.index_add_(0, codes[known, j], w)
            else:
                brute[y[b, j]] = 1.0
            torch.testing.assert_close(p[b, j], brute)
            assert set(valid[b, j].nonzero().flatten().tolist()) == set(codes[in_prefix, j].tolist())
    assert torch.allclose(p.sum(-1), torch.ones(n, 3))
    assert (p[~valid] == 0).all()


def test_unknown_items_get_no_mass_and_all_unknown_prefix_falls_back_to_the_target():
    index = cf_index_map(["a", "b", "c", "d"], cf_item_ids=["c", "a", "b"])  # "d" (item3) unknown to CF
    assert index.tolist() == [1, 2, 0, -1]
    cf = torch.log(torch.tensor([[3.0, 1.0, 2.0]]))  # in CF order c, a, b
    z = align_cf_logits(cf, index)
    torch.testing.assert_close(z[0, :3], HAND_Z[:3])
    p = collaborative_distribution(z, HAND_CODES, torch.tensor([[1, 2]]))
    torch.testing.assert_close(p[0, 0], torch.tensor([1 / 6 + 2 / 6, 3 / 6, 0.0]))
    torch.testing.assert_close(p[0, 1], torch.tensor([1.0, 0.0, 0.0]))  # only item2 is known under prefix 1
    z_none = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    p = collaborative_distribution(z_none, HAND_CODES, torch.tensor([[1, 2]]))
    torch.testing.assert_close(p[0, 1], torch.tensor([0.0, 0.0, 1.0]))


def test_uniform_ablation_shape_and_sums():
    u = uniform_distribution(HAND_CODES, torch.tensor([[1, 2], [0, 1]]))
    expected = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]])
    torch.testing.assert_close(u, expected)
    codes = random_table(40, 3, 6, seed=2)
    n = codes.shape[0]
    u = uniform_distribution(codes, codes, codebook_size=8)
    valid = valid_next_codes(codes, codes, 8)
    assert u.shape == (n, 3, 8)
    torch.testing.assert_close(u.sum(-1), torch.ones(n, 3))
    torch.testing.assert_close(u[valid], (1.0 / valid.sum(-1, keepdim=True).float()).expand_as(u)[valid])
    assert (u[~valid] == 0).all()


def test_target_outside_the_table_is_rejected():
    with pytest.raises(ValueError, match="not the SCID of any item"):
        collaborative_distribution(HAND_Z.expand(1, 4), HAND_CODES, torch.tensor([[1, 1]]))


def test_soft_loss_gradient_is_the_label_weighted_posterior():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 10, generator=g, requires_grad=True)
    ids = torch.tensor([[2, 5, 7, -1], [1, 4, 8, 9]])
    labels = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.0, 0.7, 0.1, 0.2]])
    soft_ntp_loss(logits, labels, ids).sum().backward()
    P = torch.softmax(logits.detach(), dim=-1)
    y_full = torch.zeros(2, 10)
    y_full.scatter_(1, ids.clamp(min=0), labels)  # padding column carries 0
    w = y_full * P / (y_full * P).sum(-1, keepdim=True)  # dL/ds = P - ỹ·P / Σ ỹ·P
    torch.testing.assert_close(logits.grad, P - w)
    expected = -torch.log((y_full * P).sum(-1))
    torch.testing.assert_close(soft_ntp_loss(logits.detach(), labels, ids), expected)


def test_level_kl_is_kl_against_the_renormalised_level_softmax():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 12, generator=g)
    ids = torch.tensor([[3, 6, 9, -1]])
    p = torch.tensor([[0.0, 0.25, 0.75, 0.0]])
    q = torch.softmax(logits[0, [3, 6, 9]], dim=0)
    expected = 0.25 * math.log(0.25 / q[1]) + 0.75 * math.log(0.75 / q[2])
    torch.testing.assert_close(level_kl(logits, p, ids), torch.tensor([expected]))


# --------------------------------------------------------------------------- the full causal-LM batch

LEVELS, SIZE, N_TEXT = 2, 3, 40  # SCID token of (level l, code c) = N_TEXT + l * SIZE + c
EOS = 2


def tiny_batch(seed: int = 0):
    """A right-padded SFT-like batch: prompt (masked), response, EOS; examples 0, 2 have SCID responses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = N_TEXT + LEVELS * SIZE
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        )
    )
    level_ids = N_TEXT + torch.arange(LEVELS * SIZE).view(LEVELS, SIZE)
    target_rows = torch.tensor([3, -1, 1, -1])
    lengths = [(5, None), (4, 3), (7, None), (6, 1)]  # (prompt length, text response length or SCID)
    t = 11
    input_ids = torch.zeros(4, t, dtype=torch.long)
    labels = torch.full((4, t), -100)
    attention = torch.zeros(4, t, dtype=torch.long)
    scid_start = torch.full((4,), -1)
    for b, (n_prompt, n_text) in enumerate(lengths):
        prompt = torch.randint(3, N_TEXT, (n_prompt,))
        if target_rows[b] >= 0:
            codes = HAND_CODES[target_rows[b]]
            response = torch.cat([level_ids[torch.arange(LEVELS), codes], torch.tensor([EOS])])
            scid_start[b] = n_prompt
        else:
            response = torch.cat([torch.randint(3, N_TEXT, (n_text,)), torch.tensor([EOS])])
        seq = torch.cat([prompt, response])
        input_ids[b, : len(seq)] = seq
        attention[b, : len(seq)] = 1
        labels[b, n_prompt : len(seq)] = response
    cf = torch.randn(4, 4)
    return model, input_ids, attention, labels, target_rows, scid_start, cf, level_ids


@pytest.mark.parametrize("variant", ["soft_ntp", "aux_kl"])
@pytest.mark.parametrize("label", ["cf", "uniform"])
def test_alpha_zero_reproduces_hf_causal_lm_loss(variant, label):
    model, ids, attn, labels, rows, start, cf, level_ids = tiny_batch()
    out = model(input_ids=ids, attention_mask=attn, labels=labels)
    tca = TCA4Rec(HAND_CODES, level_ids, alpha=0.0, variant=variant, label=label)
    ours = tca.loss(out.logits, labels, rows, start, cf)
    assert torch.allclose(ours, out.loss, atol=1e-6, rtol=1e-6), (ours.item(), out.loss.item())
    hf_sum = model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=7).loss
    assert torch.allclose(tca.loss(out.logits, labels, rows, start, cf, num_items_in_batch=7), hf_sum, atol=1e-6)


def test_batch_loss_matches_a_per_token_reference():
    model, ids, attn, labels, rows, start, cf, level_ids = tiny_batch(seed=1)
    logits = model(input_ids=ids, attention_mask=attn).logits.detach()
    alpha = 0.4
    tca = TCA4Rec(HAND_CODES, level_ids, alpha=alpha)
    dist = {
        b: collaborative_distribution(cf[b : b + 1], HAND_CODES, HAND_CODES[rows[b]].view(1, -1))[0] for b in (0, 2)
    }
    kl_total, ce_total, soft_total, n = 0.0, 0.0, 0.0, 0
    for b in range(4):
        for t in range(1, ids.shape[1]):
            if labels[b, t] < 0:
                continue
            n += 1
            log_p = torch.log_softmax(logits[b, t - 1], dim=-1)
            ce = -log_p[labels[b, t]].item()
            ce_total += ce
            j = t - int(start[b])
            if rows[b] >= 0 and 0 <= j < LEVELS:
                y = HAND_CODES[rows[b], j]
                label = (1 - alpha) * F.one_hot(y, SIZE).float() + alpha * dist[b][j]
                soft_total += -torch.log((label * log_p[level_ids[j]].exp()).sum()).item()
                q = torch.softmax(logits[b, t - 1, level_ids[j]], dim=-1)
                p = dist[b][j]
                kl_total += sum(float(p[v]) * math.log(float(p[v] / q[v])) for v in range(SIZE) if p[v] > 0)
            else:
                soft_total += ce
    ours = tca.loss(logits, labels, rows, start, cf)
    assert ours.item() == pytest.approx(soft_total / n, rel=1e-5)
    assert abs(ours.item() - ce_total / n) > 1e-3  # α > 0 changes the SCID positions
    aux = TCA4Rec(HAND_CODES, level_ids, alpha=alpha, variant="aux_kl").loss(logits, labels, rows, start, cf)
    assert aux.item() == pytest.approx((ce_total + alpha * kl_total) / n, rel=1e-5)


def test_batch_gradient_at_a_scid_position_is_p_minus_weighted_posterior():
    model, ids, attn, labels, rows, start, cf, level_ids = tiny_batch(seed=2)
    logits = model(input_ids=ids, attention_mask=attn).logits.detach().requires_grad_(True)
    tca = TCA4Rec(HAND_CODES, level_ids, alpha=0.3)
    tca.loss(logits, labels, rows, start, cf).backward()
    n = int((labels[:, 1:] >= 0).sum())
    b, j = 0, 1
    t = int(start[b]) + j - 1
    y = HAND_CODES[rows[b]].view(1, -1)
    label = soft_labels(y, collaborative_distribution(cf[b : b + 1], HAND_CODES, y), 0.3)[0, j]
    P = torch.softmax(logits.detach()[b, t], dim=-1)
    y_full = torch.zeros_like(P)
    y_full[level_ids[j]] = label
    torch.testing.assert_close(logits.grad[b, t] * n, P - y_full * P / (y_full * P).sum())


def test_misaligned_positions_and_bad_settings_raise():
    model, ids, attn, labels, rows, start, cf, level_ids = tiny_batch()
    logits = model(input_ids=ids, attention_mask=attn).logits
    tca = TCA4Rec(HAND_CODES, level_ids, alpha=0.3)
    with pytest.raises(ValueError, match="misaligned"):
        tca.loss(logits, labels, rows, start + 1, cf)
    with pytest.raises(ValueError, match="needs cf_logits"):
        tca.loss(logits, labels, rows, start, None)
    with pytest.raises(ValueError, match="alpha"):
        TCA4Rec(HAND_CODES, level_ids, alpha=1.5)
    with pytest.raises(ValueError, match="variant"):
        TCA4Rec(HAND_CODES, level_ids, variant="kl")
    with pytest.raises(ValueError, match="all -1"):
        tca4rec_causal_lm_loss(
            logits, labels, torch.tensor([[5, -1], [-1, -1], [-1, -1], [-1, -1]]), torch.zeros(4, 2, dtype=torch.long),
            torch.zeros(4, 2, 3), level_ids, 0.3,
        )


def test_from_item_scids_and_history_from_prompt():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + vocabulary("item", [2, 3]) + vocabulary("user", [2])
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    scids = pd.DataFrame(
        {"id": ["a", "b", "c", "d"], "codes": [list(c) for c in HAND_CODES.tolist()]}
    ).assign(tokens=lambda d: [codes_to_tokens(c, "item") for c in d["codes"]])
    tca = TCA4Rec.from_item_scids(scids, tok, cf_item_ids=["d", "c", "b", "a"], alpha=0.2)
    assert tca.level_token_ids.tolist() == [[2, 3, -1], [4, 5, 6]]
    assert tca.cf_index.tolist() == [3, 2, 1, 0]
    cf = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))  # CF order d, c, b, a -> rows get 1, 2, 3, 4
    torch.testing.assert_close(tca.target_distribution(torch.tensor([3]), cf)[0, 1], torch.tensor([3 / 7, 0.0, 4 / 7]))

    by_tokens = dict(zip(scids["tokens"], scids["id"]))
    prompt = seq_prompt(list(scids["tokens"][[2, 0]]), "<u0_1><u1_0>", template_id=1)
    assert history_from_prompt(prompt, by_tokens, levels=2) == ["c", "a"]

    missing = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))
    with pytest.raises(KeyError, match="missing from the tokenizer"):
        TCA4Rec.from_item_scids(scids, missing)
