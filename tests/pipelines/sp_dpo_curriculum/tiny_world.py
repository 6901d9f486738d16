"""A tiny, seeded world for the DPO tests: items and users with SCIDs, chronological interactions with
ratings and reviews, the contract's tables (train_sequences, valid, test, feedback, sft_examples) and a
from-config Llama RecLM over a word-level tokenizer that holds every SCID token."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from kedro.io import MemoryDataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.sft.prompts import SEQ_TEMPLATES, seq_prompt
from align3gr_pipelines.tokenizer.scid import codes_to_tokens, vocabulary


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so a test can read every intermediate output."""

    def _release(self) -> None:
        pass


SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]


def make_tokenizer(item_codebooks: list[int], user_codebooks: list[int]) -> PreTrainedTokenizerFast:
    words: dict[str, int] = {t: i for i, t in enumerate(SPECIALS)}
    pre = pre_tokenizers.Whitespace()
    for text in [*SEQ_TEMPLATES, "this user"]:
        for w, _ in pre.pre_tokenize_str(text.replace("{history}", " ").replace("{user}", " ")):
            words.setdefault(w, len(words))
    words.setdefault(",", len(words))
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    core.pre_tokenizer = pre
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", words["[BOS]"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    tok.add_tokens(vocabulary("item", item_codebooks) + vocabulary("user", user_codebooks))
    return tok


def make_rec_lm(tok: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 32, layers: int = 2) -> RecLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    meta = {"backbone": "scratch", "peft": False, "base_model": None, "item_scid_levels": 3, "stage": "sft", "trained_from": {}}
    return RecLM(model=model, tokenizer=tok, meta=meta)


@dataclass
class TinyWorld:
    item_scids: pd.DataFrame
    user_scids: pd.DataFrame
    interactions: pd.DataFrame
    train_sequences: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    feedback: pd.DataFrame
    sft_examples: pd.DataFrame
    policy: RecLM
    seq_eval_prompts: pd.DataFrame  # split, user_id, prompt, target: what valid recall scores


def _level(r: float) -> str:
    return "disliked" if r <= 2 else ("neutral" if r < 4 else "liked")


def make_world(
    n_users: int = 10, n_items: int = 40, seq_len: tuple[int, int] = (9, 14), seed: int = 0, sft_stride: int = 1
) -> TinyWorld:
    """``sft_stride``: only every sft_stride-th training transition becomes an SFT SEQ example (as
    sft_data.target_stride does), so the others are DPO prompts that SFT never answered."""
    rng = np.random.default_rng(seed)
    item_cb, user_cb = [4, 4, 4], [3, 3]
    combos = rng.permutation(np.array(np.meshgrid(*[range(c) for c in item_cb], indexing="ij")).reshape(3, -1).T)[:n_items]
    item_ids = [f"it{i}" for i in range(n_items)]
    item_scids = pd.DataFrame(
        {"id": item_ids, "codes": [list(map(int, c)) for c in combos], "tokens": [codes_to_tokens(c, "item") for c in combos]}
    )
    user_ids = [f"u{u}" for u in range(n_users)]
    ucodes = rng.integers(0, 3, size=(n_users, 2))
    user_scids = pd.DataFrame(
        {"id": user_ids, "codes": [list(map(int, c)) for c in ucodes], "tokens": [codes_to_tokens(c, "user") for c in ucodes]}
    )
    tok_of = dict(zip(item_ids, item_scids["tokens"]))
    utok = dict(zip(user_ids, user_scids["tokens"]))

    rows, seqs, valid, test, fb, sft = [], [], [], [], [], []
    for u in user_ids:
        n = int(rng.integers(seq_len[0], seq_len[1] + 1))
        seq = list(rng.choice(item_ids, size=n, replace=False))
        ratings = rng.choice(np.arange(1.0, 5.5, 0.5), size=n)
        for p, (it, r) in enumerate(zip(seq, ratings)):
            review = None if p % 4 else f"review of {it}"
            rows.append({"user_id": u, "item_id": it, "timestamp": 1_000_000 + 100 * p, "rating": float(r), "review": review})
            split = "train" if p < n - 2 else ("valid" if p == n - 2 else "test")
            fb.append(
                {"user_id": u, "item_id": it, "level": _level(r), "source": "rating", "rating": float(r),
                 "timestamp": 1_000_000 + 100 * p, "split": split}
            )
        for p in range(1, n - 2):
            hist = seq[:p][-20:]
            seqs.append({"user_id": u, "history": hist, "target": seq[p], "position": p})
            tid = int(rng.integers(0, len(SEQ_TEMPLATES)))
            if (n - 3 - p) % sft_stride:
                continue
            sft.append(
                {"task": "seq", "template_id": tid, "prompt": seq_prompt([tok_of[i] for i in hist], utok[u], tid),
                 "response": tok_of[seq[p]], "user_id": u, "split": "train", "target_item_id": seq[p]}
            )
        valid.append({"user_id": u, "history": seq[: n - 2][-20:], "target": seq[n - 2], "position": n - 2})
        test.append({"user_id": u, "history": seq[: n - 1][-20:], "target": seq[n - 1], "position": n - 1})
        hist = seq[: n - 2][-20:]
        sft.append(
            {"task": "seq", "template_id": 0, "prompt": seq_prompt([tok_of[i] for i in hist], utok[u], 0),
             "response": tok_of[seq[n - 2]], "user_id": u, "split": "valid", "target_item_id": seq[n - 2]}
        )
    # A non-SEQ task, which DPO must ignore.
    sft.append({"task": "item_scid2text", "template_id": 0, "prompt": "What is the title of item x?", "response": "a title",
                "user_id": None, "split": "train", "target_item_id": None})
    tok = make_tokenizer(item_cb, user_cb)
    sft_df = pd.DataFrame(sft)
    vrows = sft_df[sft_df["split"] == "valid"]
    seq_eval = pd.DataFrame({"split": "valid", "user_id": vrows["user_id"], "prompt": vrows["prompt"], "target": vrows["target_item_id"]})
    return TinyWorld(
        item_scids=item_scids,
        user_scids=user_scids,
        interactions=pd.DataFrame(rows),
        train_sequences=pd.DataFrame(seqs),
        valid=pd.DataFrame(valid),
        test=pd.DataFrame(test),
        feedback=pd.DataFrame(fb),
        sft_examples=sft_df,
        policy=make_rec_lm(tok, seed),
        seq_eval_prompts=seq_eval.reset_index(drop=True),
    )


def make_lora_rec_lm(world: "TinyWorld", root, dtype: str = "float32") -> RecLM:
    """The SFT RecLM of kind hf (LoRA r 4 on q/v + the SCID rows as trainable tokens) over a tiny random Llama
    with an untied head, saved under ``root/base`` as a "pretrained" model; its weights in ``dtype``."""
    from pathlib import Path

    from align3gr_pipelines.lm.backbone import build_backbone, scid_vocabulary, train_bpe_tokenizer

    base_dir = Path(root) / "base"
    texts = world.sft_examples["prompt"].tolist()[:60]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    base.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    cfg = {"kind": "hf", "dtype": dtype, "hf": {"name_or_path": str(base_dir), "gguf_file": None,
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}}
    return build_backbone(cfg, texts, scid_vocabulary(world.item_scids, world.user_scids), seed=0, item_scid_levels=3)
