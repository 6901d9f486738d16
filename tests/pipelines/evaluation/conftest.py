"""Fixtures of the evaluation tests: a tiny from-config Llama, a word-level tokenizer that holds the SCID
tokens, random unique item SCIDs, and a small leave-one-out dataset with SEQ prompts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.sft.prompts import SEQ_TEMPLATES, seq_prompt
from align3gr_pipelines.tokenizer.scid import codes_to_tokens, vocabulary

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer(scid_tokens: list[str]) -> PreTrainedTokenizerFast:
    words = sorted({w.strip(",.:") for t in SEQ_TEMPLATES for w in t.split()} | {",", ".", ":", "this", "user"})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [w for w in words if w])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_tokens(scid_tokens)  # SCID tokens must match as whole units, even with no space between them
    return tok


def tiny_llama(vocab_size: int, seed: int, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def random_unique_codes(n: int, levels: int, codes_per_level: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    space = codes_per_level**levels
    if n > space:
        raise ValueError("catalogue larger than the code space")
    flat = rng.choice(space, size=n, replace=False)
    return np.stack([(flat // codes_per_level**(levels - 1 - l)) % codes_per_level for l in range(levels)], axis=1)


def make_rec_lm(tokenizer: PreTrainedTokenizerFast, seed: int, stage: str, **meta) -> RecLM:
    model = tiny_llama(len(tokenizer), seed)
    return RecLM(model=model, tokenizer=tokenizer, meta={"backbone": "scratch", "peft": False, "stage": stage, **meta})


def make_dataset(n_users: int, n_items: int, levels: int = 3, codes: int = 6, seed: int = 0) -> dict:
    """Synthetic leave-one-out data: items, train_sequences/valid/test, SCID tables, SEQ eval prompts."""
    rng = np.random.default_rng(seed)
    item_ids = [f"i{k}" for k in range(n_items)]
    items = pd.DataFrame({"item_id": item_ids, "title": item_ids, "description": "", "brand": "", "categories": "", "text": item_ids})
    pop = rng.zipf(1.6, size=n_items).astype(float)
    pop /= pop.sum()
    train_rows, valid_rows, test_rows = [], [], []
    for u in range(n_users):
        seq = list(rng.choice(item_ids, size=int(rng.integers(4, 12)), p=pop))
        uid = f"u{u}"
        for p in range(1, len(seq) - 2):
            train_rows.append({"user_id": uid, "history": seq[max(0, p - 20):p], "target": seq[p], "position": p})
        n = len(seq)
        valid_rows.append({"user_id": uid, "history": seq[max(0, n - 22):n - 2], "target": seq[n - 2], "position": n - 2})
        test_rows.append({"user_id": uid, "history": seq[max(0, n - 21):n - 1], "target": seq[n - 1], "position": n - 1})
    item_codes = random_unique_codes(n_items, levels, codes, seed + 1)
    item_scids = pd.DataFrame({"id": item_ids, "codes": [list(map(int, c)) for c in item_codes],
                               "tokens": [codes_to_tokens(c, "item") for c in item_codes]})
    user_codes = rng.integers(0, 4, size=(n_users, 2))
    user_scids = pd.DataFrame({"id": [f"u{u}" for u in range(n_users)], "codes": [list(map(int, c)) for c in user_codes],
                               "tokens": [codes_to_tokens(c, "user") for c in user_codes]})
    tok_of = dict(zip(item_scids["id"], item_scids["tokens"]))
    user_tok = dict(zip(user_scids["id"], user_scids["tokens"]))
    prompts = []
    for split, rows in (("valid", valid_rows), ("test", test_rows)):
        for r in rows:
            prompts.append({"user_id": r["user_id"], "split": split,
                            "prompt": seq_prompt([tok_of[i] for i in r["history"]], user_tok[r["user_id"]], 0),
                            "target": r["target"], "target_tokens": tok_of[r["target"]]})
    scid_vocab = vocabulary("item", [codes] * levels) + vocabulary("user", [4, 4])
    return {
        "items": items,
        "train_sequences": pd.DataFrame(train_rows),
        "valid": pd.DataFrame(valid_rows),
        "test": pd.DataFrame(test_rows),
        "item_scids": item_scids,
        "user_scids": user_scids,
        "seq_eval_prompts": pd.DataFrame(prompts),
        "tokenizer": make_tokenizer(scid_vocab),
    }


@pytest.fixture(scope="session")
def tiny_data() -> dict:
    return make_dataset(n_users=40, n_items=60)
