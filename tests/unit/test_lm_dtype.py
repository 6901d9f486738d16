"""The LM's weight dtype and autocast (lm/precision.py): parsing, what `auto` resolves to, loading a RecLM in
a dtype, and that CPU decoding and DPO are unchanged with autocast `auto` (issue 27, item 1)."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from align3gr_pipelines.lm import precision
from align3gr_pipelines.lm.backbone import build_backbone, scid_vocabulary
from align3gr_pipelines.lm.constrained_decoding import constrained_beam_search, item_logprobs
from align3gr_pipelines.lm.rec_lm import RecLM, encode_prompt
from align3gr_pipelines.lm.scid_catalog import SCIDCatalog
from align3gr_pipelines.preference.dpo_stage import train_stage
from align3gr_pipelines.preference.dpo_trainer import DPOConfig, examples_from_pairs, reference_logps
from align3gr_pipelines.preference.self_play import build_pairs, item_code_table, sample_prompts
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_lora_rec_lm, make_world

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=8, seed=1)


@pytest.fixture
def fake_cuda_bf16(monkeypatch):
    """A CUDA GPU with bf16, as far as `precision` asks (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


# ---------------------------------------------------------------- settings


def test_dtype_settings_parse_and_bad_ones_name_the_parameter():
    assert precision.check_dtype_setting("bfloat16") == "bfloat16"
    assert precision.check_dtype_setting(torch.float16) == "float16"
    with pytest.raises(ValueError, match=r"sft_train\.backbone\.dtype must be one of .*'auto'.*got 'bf16'"):
        precision.check_dtype_setting("bf16", "sft_train.backbone.dtype")
    with pytest.raises(ValueError, match="torch dtype torch.float64 is not supported"):
        precision.check_dtype_setting(torch.float64, "dtype")
    with pytest.raises(ValueError, match=r"x\.autocast must be one of"):
        precision.check_autocast_setting("on", "x.autocast")
    for name, dtype in precision.DTYPES.items():
        for frozen in (True, False):
            assert precision.resolve_dtype(name, CPU, frozen_base=frozen) == dtype


def test_auto_is_float32_on_cpu_and_bf16_only_for_a_frozen_base_on_cuda(fake_cuda_bf16):
    for device in ("cpu", "mps"):
        assert precision.resolve_dtype("auto", device, frozen_base=True) == torch.float32
    assert precision.resolve_dtype("auto", "cuda", frozen_base=True) == torch.bfloat16
    assert precision.resolve_dtype("auto", "cuda", frozen_base=False) == torch.float32  # a model that trains
    ctx = precision.autocast("auto", "cuda")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cuda"
    assert isinstance(precision.autocast("off", "cuda"), contextlib.nullcontext)


def test_autocast_auto_is_a_no_op_on_cpu():
    assert isinstance(precision.autocast("auto", CPU), contextlib.nullcontext)
    with precision.autocast("auto", CPU):
        assert not torch.is_autocast_enabled("cpu")
        assert precision.compute_dtype(CPU, torch.float32) == torch.float32
    with precision.autocast("bfloat16", CPU):  # explicit: on any device
        assert torch.is_autocast_enabled("cpu")
        assert precision.compute_dtype(CPU, torch.float32) == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


# ---------------------------------------------------------------- loading in a dtype


def _save_full(world, path, **meta):
    rec = copy.copy(world.policy)
    rec.meta = {**world.policy.meta, **meta}
    rec.save_pretrained(str(path))
    return path


def _dtypes(model, trainable=None):
    return {p.dtype for n, p in model.named_parameters() if trainable is None or p.requires_grad == trainable}


def test_a_saved_llama_loads_in_the_requested_dtype(world, tmp_path):
    plain = _save_full(world, tmp_path / "plain")  # an older bundle: no meta "dtype"
    assert _dtypes(RecLM.from_pretrained(str(plain), device="cpu").model) == {torch.float32}  # checkpoint -> auto -> fp32
    bf16 = RecLM.from_pretrained(str(plain), device="cpu", dtype="bfloat16")
    assert _dtypes(bf16.model) == {torch.bfloat16}
    ref = world.policy.model.state_dict()
    assert all(torch.equal(t, ref[n].to(torch.bfloat16)) for n, t in bf16.model.state_dict().items())
    marked = _save_full(world, tmp_path / "marked", dtype="bfloat16")
    assert _dtypes(RecLM.from_pretrained(str(marked), device="cpu").model) == {torch.bfloat16}  # the recorded setting
    assert _dtypes(RecLM.from_pretrained(str(marked), device="cpu", dtype="float32").model) == {torch.float32}
    with pytest.raises(ValueError, match=r"RecLM\.from_pretrained\(.*plain\): dtype must be one of .*got 'half'"):
        RecLM.from_pretrained(str(plain), device="cpu", dtype="half")
    broken = _save_full(world, tmp_path / "broken", dtype="fp8")
    with pytest.raises(ValueError, match=r"rec_lm\.json: 'dtype' must be one of .*got 'fp8'"):
        RecLM.from_pretrained(str(broken), device="cpu")


def _scratch_cfg(**kw):
    scratch = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return {"kind": "scratch", "scratch": scratch, **kw}


def test_scratch_backbone_dtype_is_recorded_and_auto_keeps_float32(world):
    texts = world.sft_examples["prompt"].tolist()[:60]
    vocab = scid_vocabulary(world.item_scids, world.user_scids)
    auto = build_backbone(_scratch_cfg(), texts, vocab, seed=0, item_scid_levels=3)
    assert auto.meta["dtype"] == "auto" and _dtypes(auto.model) == {torch.float32}
    half = build_backbone(_scratch_cfg(dtype="bfloat16"), texts, vocab, seed=0, item_scid_levels=3)
    assert half.meta["dtype"] == "bfloat16"
    ref = auto.model.state_dict()  # same seed: the fp32 init, rounded
    for n, t in half.model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[n].to(torch.bfloat16)), n
    with pytest.raises(ValueError, match=r"sft_train\.backbone\.dtype must be one of"):
        build_backbone(_scratch_cfg(dtype="fp16"), texts, vocab, seed=0, item_scid_levels=3)


@pytest.fixture(scope="module")
def bf16_lora_policy(world, tmp_path_factory):
    """kind hf with dtype bfloat16 over a tiny local Llama: saved, then loaded back as a DPO stage loads it."""
    root = tmp_path_factory.mktemp("lora")
    built = make_lora_rec_lm(world, root, dtype="bfloat16")
    built.save_pretrained(str(root / "sft"))
    return built, root / "sft"


def test_a_lora_model_keeps_its_base_in_bf16_and_its_adapter_in_fp32(bf16_lora_policy):
    built, path = bf16_lora_policy
    assert built.meta["dtype"] == "bfloat16"
    assert _dtypes(built.model, trainable=False) == {torch.bfloat16}
    assert _dtypes(built.model, trainable=True) == {torch.float32}
    loaded = RecLM.from_pretrained(str(path), device="cpu", trainable=True)
    assert _dtypes(loaded.model, trainable=False) == {torch.bfloat16}
    assert _dtypes(loaded.model, trainable=True) == {torch.float32}
    assert _dtypes(RecLM.from_pretrained(str(path), device="cpu", dtype="float32").model) == {torch.float32}


def test_dpo_in_place_on_a_bf16_base_shares_the_base_and_trains_the_fp32_adapter(world, bf16_lora_policy):
    _, path = bf16_lora_policy
    policy = RecLM.from_pretrained(str(path), device="cpu")
    pairs = _pairs(world, n=6)
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in policy.model.named_parameters() if p.dtype == torch.bfloat16}
    adapter = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.dtype == torch.float32}
    cfg = DPOConfig(learning_rate=1e-2, batch_size=3, show_progress=False, device="cpu", in_place=True)
    new, metrics = train_stage(policy, pairs, cfg, 0, "sp_dpo_easy", "sft")
    assert new.model is policy.model  # in place: one copy of the weights
    now = dict(new.model.named_parameters())
    for n, (ptr, before) in base.items():  # the bf16 base: same storage, same values
        assert now[n].data_ptr() == ptr and now[n].dtype == torch.bfloat16 and torch.equal(now[n], before)
    assert any(not torch.equal(now[n], before) for n, before in adapter.items())
    assert all(now[n].dtype == torch.float32 for n in adapter)
    assert np.isfinite(metrics["scalars"]["final_loss"])


# ---------------------------------------------------------------- CPU results unchanged under autocast auto


def _catalog_and_prompts(world, n=6):
    tok = world.policy.tokenizer
    catalog = SCIDCatalog.from_scids(world.item_scids, tok)
    return catalog, [encode_prompt(tok, p) for p in world.sft_examples["prompt"].tolist()[:n]]


@pytest.mark.parametrize("attention", ["tree", "expand"])
def test_decoding_with_autocast_auto_on_cpu_is_exactly_the_fp32_decoding(world, attention):
    catalog, prompts = _catalog_and_prompts(world)
    model, pad = world.policy.model, world.policy.tokenizer.pad_token_id
    kw = dict(beam_width=8, top_k=8, batch_size=4, pad_token_id=pad, attention=attention)
    off = constrained_beam_search(model, prompts, catalog, autocast="off", **kw)
    for setting in ("auto", None):  # None: the default
        got = constrained_beam_search(model, prompts, catalog, **kw, **({"autocast": setting} if setting else {}))
        assert torch.equal(got[0], off[0]) and torch.equal(got[1], off[1])
    # The parameter is live: real bf16 autocast (forced on this CPU) moves the scores; the tree mask follows it.
    half = constrained_beam_search(model, prompts, catalog, autocast="bfloat16", **kw)
    assert not torch.equal(half[1], off[1]) and (half[0] >= 0).all()
    with pytest.raises(ValueError, match="constrained_beam_search: autocast must be one of"):
        constrained_beam_search(model, prompts, catalog, autocast="yes", **kw)


def test_item_logprobs_with_autocast_auto_on_cpu_is_exactly_fp32(world):
    catalog, prompts = _catalog_and_prompts(world, n=3)
    model, pad = world.policy.model, world.policy.tokenizer.pad_token_id
    off = item_logprobs(model, prompts, catalog, pad_token_id=pad, autocast="off")
    assert torch.equal(item_logprobs(model, prompts, catalog, pad_token_id=pad), off)
    assert not torch.equal(item_logprobs(model, prompts, catalog, pad_token_id=pad, autocast="bfloat16"), off)


def _pairs(world, n=8, n_neg=4, seed=0):
    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, seed)
    return build_pairs(prompts.head(n), ids, codes, tokens, None, None, n_neg, np.random.default_rng(seed))[0]


def test_dpo_with_autocast_auto_on_cpu_is_exactly_the_fp32_stage(world):
    pairs = _pairs(world, n=4, n_neg=3)
    cfg = dict(learning_rate=1e-3, batch_size=2, show_progress=False, device="cpu")
    runs = {a: train_stage(world.policy, pairs, DPOConfig(**cfg, autocast=a), 0, "s", "r") for a in ("off", "auto")}
    (m_off, r_off), (m_auto, r_auto) = runs["off"], runs["auto"]
    assert r_auto["curves"] == r_off["curves"]
    assert m_auto.meta["dpo"]["policy_fingerprint"] == m_off.meta["dpo"]["policy_fingerprint"]
    _, r_half = train_stage(world.policy, pairs, DPOConfig(**cfg, autocast="bfloat16"), 0, "s", "r")
    assert r_half["curves"]["loss"] != r_off["curves"]["loss"]  # the training passes honour the setting
    examples = examples_from_pairs(pairs, world.policy.tokenizer)
    pad = world.policy.tokenizer.pad_token_id
    off = reference_logps(world.policy.model, examples, pad, 4, show_progress=False, autocast="off")
    half = reference_logps(world.policy.model, examples, pad, 4, show_progress=False, autocast="bfloat16")
    assert any(not torch.equal(a, b) for a, b in zip(off, half))  # the reference pass honours the setting
    with pytest.raises(ValueError, match=r"sp_dpo_curriculum\.training\.autocast must be one of"):
        DPOConfig.from_params({"autocast": "bf16"}, "sp_dpo_curriculum.training")


def test_dtype_on_resolves_a_bundle_for_the_device_it_will_train_on(world, tmp_path, bf16_lora_policy, monkeypatch):
    """SFT resumes and torchrun ranks load on the CPU a model that trains elsewhere: its dtype is judged there."""
    import json

    plain = _save_full(world, tmp_path / "plain")
    _, lora = bf16_lora_policy
    auto_lora = tmp_path / "auto_lora"
    import shutil

    shutil.copytree(lora, auto_lora)
    meta_path = auto_lora / "rec_lm.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "dtype": "auto"}))
    assert RecLM.dtype_on(str(plain), "cpu") == torch.float32 and RecLM.dtype_on(str(auto_lora), "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert RecLM.dtype_on(str(auto_lora), "cuda") == torch.bfloat16  # a frozen LoRA base on a bf16 GPU
    assert RecLM.dtype_on(str(plain), "cuda") == torch.float32       # a model trained weight by weight stays fp32
