"""The SASRec collaborative encoder / baseline: contract interface, training data, persistence, and the two
training losses (full-softmax CE, the default; BCE with one sampled negative, the paper's baselines')."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from align3gr_pipelines.cf.sasrec import (
    SASRec,
    _pad_left,
    _windows,
    bce_loss,
    fit_sasrec,
    recall_ndcg,
    sample_negatives,
    training_sequences,
)


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


def test_bce_loss_by_hand_on_one_user_with_fixed_negatives():
    """One user a b c d: three positions (a→b, ab→c, abc→d), negatives fixed to c, a, b. Expected, in numpy:
    the mean over positions of -log σ(h·e⁺) - log(1 - σ(h·e⁻))."""
    torch.manual_seed(0)
    model = SASRec(["a", "b", "c", "d", "e"], hidden_dim=8, max_len=3, dropout=0.0).eval()
    seq = torch.tensor([[model.item_index[i] for i in "abcd"]])  # one training window: max_len + 1 items
    inputs, labels = seq[:, :-1], seq[:, 1:]
    negatives = torch.tensor([3, 1, 2])
    h = model(inputs)[0]
    got = bce_loss(model, h, labels[0], negatives)

    hn, table = h.detach().double().numpy(), model.item_emb.weight.detach().double().numpy()
    pos = (hn * table[labels[0].numpy()]).sum(1)
    neg = (hn * table[negatives.numpy()]).sum(1)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    expected = np.mean(-np.log(sigmoid(pos)) - np.log(1.0 - sigmoid(neg)))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_fit_with_bce_logs_that_loss_when_the_negative_is_forced():
    """Two items: each position's one negative is the other item, so the epoch loss of a zero-lr epoch is
    known by hand."""
    torch.manual_seed(0)
    model = SASRec(["x", "y"], hidden_dim=8, max_len=3, dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = fit_sasrec(model, [["x", "y", "x", "y"]], epochs=1, batch_size=4, lr=0.0, seed=0, loss="bce")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    seq = torch.tensor([[1, 2, 1, 2]])  # the one training window (max_len + 1 items)
    labels = seq[0, 1:]
    with torch.no_grad():
        h = model(seq[:, :-1])[0]
        pos = (h * model.item_emb(labels)).sum(-1)
        neg = (h * model.item_emb(3 - labels)).sum(-1)  # the other of items 1 and 2
    expected = (-F.logsigmoid(pos) - F.logsigmoid(-neg)).mean().item()
    assert log["curves"]["sasrec_train_loss"][0][1] == pytest.approx(expected, rel=1e-5)


def test_sampled_negatives_are_uniform_over_the_other_items_and_seeded():
    positives = torch.tensor([1, 3, 5] * 4000)
    negatives = sample_negatives(positives, 5, torch.Generator().manual_seed(0))
    assert not (negatives == positives).any() and negatives.min() >= 1 and negatives.max() <= 5
    for p in (1, 3, 5):
        counts = torch.bincount(negatives[positives == p], minlength=6)[1:].float()
        others = counts[torch.arange(5) != p - 1]
        assert counts[p - 1] == 0 and (others / others.sum() - 0.25).abs().max() < 0.03
    assert torch.equal(negatives, sample_negatives(positives, 5, torch.Generator().manual_seed(0)))


def _fit_ce_as_before(model: SASRec, sequences, epochs: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """The CE training loop as it was before the `loss` option (CPU), kept as the reference."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    idx = [[model.item_index[str(i)] for i in s if str(i) in model.item_index] for s in sequences]
    data = _pad_left(_windows(idx, model.max_len), model.max_len + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data), generator=gen)
        total, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for start in range(0, len(data), batch_size):
            batch = data[order[start : start + batch_size]]
            inputs, labels = batch[:, :-1], batch[:, 1:]
            mask = (inputs > 0) & (labels > 0)
            h = model(inputs)
            logits = h[mask] @ model.item_embeddings().T
            loss = F.cross_entropy(logits.float(), labels[mask] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.detach() * mask.sum(), count + mask.sum()
        losses.append(float(total / count.clamp(min=1)))
    return losses


def test_loss_ce_is_the_default_and_unchanged():
    items = [f"i{k}" for k in range(15)]
    rng = np.random.default_rng(3)
    sequences = [list(rng.choice(items, size=int(rng.integers(2, 14)))) for _ in range(30)]
    models = []
    for _ in range(3):
        torch.manual_seed(1)
        models.append(SASRec(items, hidden_dim=16, n_layers=2, max_len=6, dropout=0.2))
    reference = _fit_ce_as_before(models[0], sequences, epochs=3, batch_size=8, lr=5e-3, seed=4)
    default = fit_sasrec(models[1], sequences, epochs=3, batch_size=8, lr=5e-3, seed=4)
    explicit = fit_sasrec(models[2], sequences, epochs=3, batch_size=8, lr=5e-3, seed=4, loss="ce")
    for log, model in ((default, models[1]), (explicit, models[2])):
        assert [v for _, v in log["curves"]["sasrec_train_loss"]] == reference
        ref_state = models[0].state_dict()
        assert all(torch.equal(ref_state[k], v) for k, v in model.state_dict().items())


def test_unknown_loss_and_bce_on_one_item_are_refused():
    with pytest.raises(ValueError, match=r"loss must be one of \['ce', 'bce'\], got 'bpr'"):
        fit_sasrec(SASRec(["a", "b"], hidden_dim=8), [["a", "b"]], epochs=1, batch_size=2, lr=1e-3, loss="bpr")
    with pytest.raises(ValueError, match="needs >= 2 items"):
        fit_sasrec(SASRec(["a"], hidden_dim=8), [["a", "a"]], epochs=1, batch_size=2, lr=1e-3, loss="bce")
