"""RecLM: the causal LM recommender bundle every LM stage reads and writes.

A RecLM is the model (a plain Hugging Face causal LM, or a PEFT/LoRA model over a base), its tokenizer
(with every user and item SCID token added as a single token) and a metadata dict (SCID vocabulary,
training arguments, metrics, lineage). It is what `CheckpointDataset` stores for `sft_model` and each
DPO stage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

META_FILE = "rec_lm.json"


def pick_device(preferred: str | None = None) -> torch.device:
    """cuda if present, then mps, else cpu; `preferred` ('cpu', 'cuda', 'auto'/None) overrides."""
    if preferred and preferred != "auto":
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids exactly as training and decoding both see them (BOS if the tokenizer adds one)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: Any, response: str, add_eos: bool = True) -> list[int]:
    """Response ids appended right after the prompt ids. A SCID response (only SCID tokens) maps one token
    per level, so constrained decoding that starts after the prompt spells exactly these ids."""
    from align3gr_pipelines.scid import split_tokens

    scid = split_tokens(response)
    if scid and "".join(scid) == response.strip():
        ids = list(tokenizer.convert_tokens_to_ids(scid))
    else:
        ids = list(tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class RecLM:
    model: Any  # transformers.PreTrainedModel or peft.PeftModel
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, tokens: list[str]) -> list[int]:
        """Ids of SCID tokens; raises if one is not in the vocabulary (no OOV allowed)."""
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        unk = self.tokenizer.unk_token_id
        missing = [t for t, i in zip(tokens, ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise KeyError(f"SCID tokens missing from the tokenizer vocabulary: {missing[:5]} ...")
        return list(ids)

    def save_pretrained(self, path: str) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        # A PEFT model saves only its adapter (+ modules_to_save); meta["base_model"] says how to rebuild the base.
        self.model.save_pretrained(str(out / "model"))
        self.tokenizer.save_pretrained(str(out / "tokenizer"))
        (out / META_FILE).write_text(json.dumps(self.meta, indent=2, default=str))

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = "auto") -> "RecLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = Path(path)
        meta = json.loads((src / META_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
        if meta.get("peft"):
            from peft import PeftModel

            base = meta["base_model"]
            base_model = AutoModelForCausalLM.from_pretrained(
                base["name_or_path"], **({"gguf_file": base["gguf_file"]} if base.get("gguf_file") else {})
            )
            base_model.resize_token_embeddings(len(tokenizer))
            model = PeftModel.from_pretrained(base_model, str(src / "model"), is_trainable=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(src / "model"))
        model.to(pick_device(device))
        model.eval()
        return cls(model=model, tokenizer=tokenizer, meta=meta)
