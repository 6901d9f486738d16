"""TCA4Rec at every labelled item position (`tca4rec.positions: all_labelled`): history SCIDs in the prompt
get soft labels from the CF model's causal output over their prefix (align3gr_pipelines.sft.tca4rec)."""
from __future__ import annotations

import pytest
import torch

from align3gr_pipelines.cf.sasrec import SASRec
from align3gr_pipelines.sft.hf_trainer import PadCollator
from align3gr_pipelines.sft.tca4rec import (
    TCA4Rec,
    causal_prefix_logits,
    collaborative_distribution,
    labelled_history_items,
    tca4rec_causal_lm_loss,
)

# 4 items, 2 levels, V = 3: item0 (0,0), item1 (0,1), item2 (1,0), item3 (1,2)
CODES = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 2]])
LEVEL_IDS = torch.tensor([[10, 11, 12], [13, 14, 15]])  # token id of (level, code); text tokens are 0..9
VOCAB, EOS, SEP = 16, 5, 3
# The CF model's logits after a prefix ending in item i (row i): known by construction.
AFTER = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 1.0, 5.0], [1.0, 2.0, 3.0, 4.0]]))


class LastItemCF(torch.nn.Module):
    """A causal stand-in for SASRec with SASRec's interface: the hidden state after an item is that item's row
    of AFTER and the item table is the identity, so the logits after a prefix are AFTER[its last item]."""

    max_len = 8

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.cat([torch.zeros(1, 4), AFTER]))  # index 0 = padding

    def item_embeddings(self) -> torch.Tensor:
        return torch.eye(4)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.table[seq]


def scid(row: int) -> list[int]:
    return [int(LEVEL_IDS[j, CODES[row, j]]) for j in range(2)]


def example(history: list[int], response: int | None, label_history: bool = True) -> dict:
    """A prompt "1 2 <h0> 3 <h1> 3 ... 4" then the response SCID (or a text token) and EOS, as encode_examples
    lays it out: the history SCIDs are labelled (history_loss), the response is."""
    ids, labels = [1, 2], [-100, -100]
    for k, row in enumerate(history):
        if k:
            ids.append(SEP), labels.append(-100)
        ids += scid(row)
        labels += scid(row) if label_history else [-100, -100]
    ids.append(4), labels.append(-100)
    start = len(ids)
    answer = scid(response) if response is not None else [7, 8]
    return {"input_ids": ids + answer + [EOS], "labels": labels + answer + [EOS], "response_start": start,
            "tca_row": -1 if response is None else response, "tca_start": start if response is not None else -1}


def batch_of(rows: list[dict], tca: TCA4Rec, with_history: bool) -> dict[str, torch.Tensor]:
    token_codes = tca.token_codes()
    by_codes = {tuple(c): k for k, c in enumerate(CODES.tolist())}
    for r in rows:
        if r["tca_row"] >= 0:
            history = [item for item, _ in _history(r, token_codes, by_codes)]
            cf = AFTER[history[-1]].unsqueeze(0)  # today's response label: the whole history's CF logits
            r["tca_dist"] = collaborative_distribution(cf, CODES, CODES[r["tca_row"]].unsqueeze(0), 3)[0]
        if with_history:
            hist, starts = labelled_history_items(r["input_ids"], r["labels"], r["response_start"], token_codes, by_codes)
            r.update(tca_hist_rows=hist, tca_hist_starts=starts)
    return PadCollator(0)(rows)


def _history(r: dict, token_codes: dict, by_codes: dict) -> list[tuple[int, int]]:
    rows, starts = labelled_history_items(r["input_ids"], r["labels"], r["response_start"], token_codes, by_codes)
    return list(zip(rows, starts))


def random_logits(batch: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch["input_ids"].shape, VOCAB, generator=g) * 2).requires_grad_(True)


def tca_loss(tca: TCA4Rec, logits: torch.Tensor, batch: dict, cf=None) -> torch.Tensor:
    return tca.loss(logits, batch["labels"], batch["tca_row"], batch["tca_start"], dist=batch["tca_dist"],
                    history_rows=batch.get("tca_hist_rows"), history_starts=batch.get("tca_hist_starts"), cf_model=cf)


ROWS = [([3, 0, 2], 1), ([1, 2], None), ([2], 3)]  # (history rows, response row or None = a text answer)


def make_rows(label_history: bool = True) -> list[dict]:
    return [example(h, r, label_history) for h, r in ROWS]


def test_soft_targets_at_history_positions_by_hand():
    tca = TCA4Rec(CODES, LEVEL_IDS, alpha=0.5, positions="all_labelled")
    batch = batch_of(make_rows(), tca, with_history=True)
    example_of, positions, codes, dist = tca.history_targets(batch["tca_hist_rows"], batch["tca_hist_starts"], LastItemCF())
    # history items t >= 1 only: example 0's items 1 and 2, example 1's item 1; example 2 has one item (plain CE)
    assert example_of.tolist() == [0, 0, 1]
    assert codes.tolist() == [[0, 0], [1, 0], [1, 0]]
    assert positions.tolist() == [[5, 6], [8, 9], [5, 6]]  # "1 2 <h0> 3 <h1>": h1's level-0 token is at 5
    # example 0, t = 1: target item0 (0,0), prefix [item3] -> logits log(1,2,3,4): items .1 .2 .3 .4
    #   level 0: code 0 = items 0+1 = .3, code 1 = items 2+3 = .7; level 1 under code 0: items 0,1 -> 1/3, 2/3
    # example 0, t = 2: target item2 (1,0), prefix [item3, item0] -> last item0's logits log(4,3,2,1): .4 .3 .2 .1
    #   level 0: .7, .3; level 1 under code 1: items 2 (.2, code 0) and 3 (.1, code 2) -> 2/3, 0, 1/3
    # example 1, t = 1: target item2, prefix [item1] -> uniform logits: level 0 .5 .5; level 1 .5 0 .5
    expected = torch.tensor([
        [[0.3, 0.7, 0.0], [1 / 3, 2 / 3, 0.0]],
        [[0.7, 0.3, 0.0], [2 / 3, 0.0, 1 / 3]],
        [[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]],
    ])
    torch.testing.assert_close(dist, expected)


def test_uniform_label_at_history_positions_needs_no_cf_model():
    tca = TCA4Rec(CODES, LEVEL_IDS, alpha=0.5, label="uniform", positions="all_labelled")
    batch = batch_of(make_rows(), tca, with_history=True)
    example_of, _, _, dist = tca.history_targets(batch["tca_hist_rows"], batch["tca_hist_starts"], cf_model=None)
    assert example_of.tolist() == [0, 0, 1]  # the same positions as the CF label
    # level 0: codes 0 and 1 are valid at the root; level 1 under code 0: {0, 1}, under code 1: {0, 2}
    expected = torch.tensor([
        [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]],
        [[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]],
        [[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]],
    ])
    torch.testing.assert_close(dist, expected)
    cf = TCA4Rec(CODES, LEVEL_IDS, positions="all_labelled")
    with pytest.raises(ValueError, match="needs the CF model"):
        cf.history_targets(batch["tca_hist_rows"], batch["tca_hist_starts"], cf_model=None)


def test_batch_loss_matches_a_per_token_reference_at_history_and_response_positions():
    alpha = 0.4
    tca = TCA4Rec(CODES, LEVEL_IDS, alpha=alpha, positions="all_labelled")
    batch = batch_of(make_rows(), tca, with_history=True)
    logits = random_logits(batch)
    ours = tca_loss(tca, logits, batch, LastItemCF())
    token_codes, by_codes = tca.token_codes(), {tuple(c): k for k, c in enumerate(CODES.tolist())}

    soft = {}  # (example, token index) -> (level, soft label over the level's codes)
    for b, r in enumerate(make_rows()):
        items = _history(r, token_codes, by_codes)
        for t, (row, start) in enumerate(items):
            if t == 0:
                continue  # no prefix: plain CE
            p = collaborative_distribution(AFTER[items[t - 1][0]].unsqueeze(0), CODES, CODES[row].unsqueeze(0), 3)[0]
            for j in range(2):
                soft[(b, start + j)] = (j, (1 - alpha) * torch.nn.functional.one_hot(CODES[row, j], 3) + alpha * p[j])
        if r["tca_row"] >= 0:
            p = collaborative_distribution(AFTER[items[-1][0]].unsqueeze(0), CODES, CODES[r["tca_row"]].unsqueeze(0), 3)[0]
            for j in range(2):
                soft[(b, r["tca_start"] + j)] = (j, (1 - alpha) * torch.nn.functional.one_hot(CODES[r["tca_row"], j], 3)
                                                 + alpha * p[j])
    total, n = 0.0, 0
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] < 0:
                continue
            n += 1
            log_p = torch.log_softmax(logits.detach()[b, t - 1], dim=-1)
            if (b, t) in soft:
                j, label = soft[(b, t)]
                total += -torch.log((label * log_p[LEVEL_IDS[j]].exp()).sum()).item()
            else:
                total += -log_p[labels[b, t]].item()
    assert len(soft) == 2 * (3 + 2)  # 3 history items with a prefix and 2 SEQ responses, 2 levels each
    assert ours.item() == pytest.approx(total / n, rel=1e-5)


def test_response_positions_and_alpha_zero_reproduce_todays_objective_bit_for_bit():
    rows = make_rows()
    for alpha in (0.0, 0.3):
        today = TCA4Rec(CODES, LEVEL_IDS, alpha=alpha)  # positions defaults to response
        batch = batch_of([dict(r) for r in rows], today, with_history=False)
        logits = random_logits(batch, seed=1)
        positions = torch.where(batch["tca_row"].unsqueeze(1) >= 0, batch["tca_start"].unsqueeze(1) + torch.arange(2), -1)
        reference = tca4rec_causal_lm_loss(logits, batch["labels"], positions, CODES[batch["tca_row"].clamp(min=0)],
                                           batch["tca_dist"], LEVEL_IDS, alpha)
        explicit = TCA4Rec(CODES, LEVEL_IDS, alpha=alpha, positions="response")
        assert torch.equal(tca_loss(explicit, logits, batch), reference)
        assert torch.equal(tca_loss(today, logits, batch), reference)

    # α = 0 with all_labelled: the soft labels are one-hot everywhere, so loss and gradient equal the response
    # objective's to the bit, though the history positions now run through the soft-label path.
    resp = TCA4Rec(CODES, LEVEL_IDS, alpha=0.0)
    full = TCA4Rec(CODES, LEVEL_IDS, alpha=0.0, positions="all_labelled")
    b_resp = batch_of([dict(r) for r in rows], resp, with_history=False)
    b_full = batch_of([dict(r) for r in rows], full, with_history=True)
    x, y = random_logits(b_resp, seed=2), random_logits(b_full, seed=2)
    loss_resp, loss_full = tca_loss(resp, x, b_resp), tca_loss(full, y, b_full, LastItemCF())
    loss_resp.backward(), loss_full.backward()
    assert torch.equal(loss_resp, loss_full) and torch.equal(x.grad, y.grad)
    # ...and α > 0 really acts at the history positions: the history tokens' gradients move
    soft = TCA4Rec(CODES, LEVEL_IDS, alpha=0.3, positions="all_labelled")
    z = random_logits(b_full, seed=2)
    tca_loss(soft, z, b_full, LastItemCF()).backward()
    history_token = int(b_full["tca_hist_starts"][0, 1]) - 1  # the logit row predicting example 0's item 1
    assert not torch.allclose(z.grad[0, history_token], x.grad[0, history_token])


def test_history_fields_need_positions_all_labelled():
    tca = TCA4Rec(CODES, LEVEL_IDS, alpha=0.3, positions="all_labelled")
    batch = batch_of(make_rows(), tca, with_history=True)
    with pytest.raises(ValueError, match="positions='response'"):
        tca_loss(TCA4Rec(CODES, LEVEL_IDS, alpha=0.3), random_logits(batch), batch, LastItemCF())
    with pytest.raises(ValueError, match="positions must be one of"):
        TCA4Rec(CODES, LEVEL_IDS, positions="history")


def test_labelled_history_items_reads_whole_scids_and_rejects_broken_ones():
    tca = TCA4Rec(CODES, LEVEL_IDS, positions="all_labelled")
    token_codes, by_codes = tca.token_codes(), {tuple(c): k for k, c in enumerate(CODES.tolist())}
    r = example([3, 0, 2], 1)
    assert labelled_history_items(r["input_ids"], r["labels"], r["response_start"], token_codes, by_codes) == (
        [3, 0, 2], [2, 5, 8])
    unlabelled = example([3, 0, 2], 1, label_history=False)  # a task outside history_loss_tasks
    assert labelled_history_items(unlabelled["input_ids"], unlabelled["labels"], unlabelled["response_start"],
                                  token_codes, by_codes) == ([], [])
    ids, labels = [1, 10, 3, 11, 15], [-100, 10, -100, 11, 15]  # a lone level-0 token, then item3
    with pytest.raises(ValueError, match="not one whole item SCID"):
        labelled_history_items(ids, labels, 5, token_codes, by_codes)
    ids = [1, 12, 15]  # codes (2, 2): both tokens exist, no item has them
    with pytest.raises(ValueError, match="not an item of item_scids"):
        labelled_history_items(ids, [-100, 12, 15], 3, token_codes, by_codes)


def test_causal_prefix_logits_of_a_real_sasrec_one_forward_windows_and_unknown_items():
    torch.manual_seed(0)
    model = SASRec([f"i{k}" for k in range(6)], hidden_dim=8, n_layers=1, n_heads=1, max_len=3, dropout=0.0).eval()
    table = model.item_embeddings()

    def outputs(items: list[int]) -> torch.Tensor:  # one causal forward's logits at every position
        return (model(torch.tensor([items]))[0] @ table.T).detach()

    out = causal_prefix_logits(model, [[1, 2, 3], [4, 0, 5, 6, 2, 1]])
    assert out.shape == (2 + 5, 6)
    # history 0 (within max_len): prefixes [1] and [1, 2] are the one forward's first two outputs (causal)
    torch.testing.assert_close(out[:2], outputs([1, 2, 3])[:2])
    # history 1: item 0 is unknown to the CF model (dropped, as SASRec.score drops it); known items 4 5 6 2 1
    # fall into the windows [4, 5] and [6, 2, 1] (cut from the end by max_len, as SASRec's training windows),
    # each item keeping its right-aligned position within its window
    torch.testing.assert_close(out[2], outputs([4, 5])[0])  # t = 1: prefix [4]
    torch.testing.assert_close(out[3], outputs([4, 5])[0])  # t = 2: prefix [4, unknown]
    torch.testing.assert_close(out[4], outputs([4, 5])[1])
    torch.testing.assert_close(out[5:7], outputs([6, 2, 1])[:2])
    assert not torch.allclose(out[2], outputs([4])[0])  # not a forward of the prefix alone: positions differ
    # a prefix of unknown items only gets SASRec.score's empty-history answer: zeros
    assert torch.equal(causal_prefix_logits(model, [[0, 3]]), torch.zeros(1, 6))
    # the last window's last output is SASRec.score of the whole history (the response's label)
    torch.testing.assert_close(outputs([6, 2, 1])[-1], model.score([["i3", "i5", "i1", "i0"]])[0])


def test_state_round_trip_for_torchrun_workers(tmp_path):
    tca = TCA4Rec(CODES, LEVEL_IDS, torch.tensor([3, 2, 1, -1]), alpha=0.2, label="uniform", positions="all_labelled")
    torch.save({"tca4rec": tca.state()}, tmp_path / "data.pt")
    back = TCA4Rec.from_state(torch.load(tmp_path / "data.pt")["tca4rec"])  # weights_only: tensors and scalars
    assert (back.alpha, back.label, back.positions, back.variant) == (0.2, "uniform", "all_labelled", "soft_ntp")
    assert torch.equal(back.codes, CODES) and torch.equal(back.cf_index, tca.cf_index)
    assert back.cf_history([0, 3]) == [4, 0]  # CF column + 1 (SASRec's item index), 0 = unknown to it
