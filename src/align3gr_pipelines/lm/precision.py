"""Numeric precision of the LM: the dtype its weights load in, and the autocast its forward passes run under.

``dtype`` (``sft_train.backbone.dtype``, then recorded in the checkpoint; see below):

- ``auto``: bfloat16 for the frozen pretrained base of a PEFT (LoRA) model on a CUDA device that supports bf16;
  float32 everywhere else: every load on a CPU (or MPS), and every full (non-PEFT) model. A full model is
  what SFT and DPO train weight by weight, and DPO's updates (lr ~1e-4 x a gradient) are far below bf16's
  resolution (8 bits of mantissa), so pure bf16 weights would silently stop learning; such a model keeps fp32
  master weights and gets its speed from autocast. The LoRA matrices and SCID rows of a PEFT model stay
  float32 whatever the base's dtype (PEFT upcasts adapters it loads or creates), so they train exactly.
- ``float32`` | ``bfloat16`` | ``float16``: that dtype for whatever is loaded (a full model, or a PEFT base).
  bf16/fp16 weights of a full model are for decoding only: DPO's updates would be lost in their rounding.

The setting is chosen once, at SFT (``sft_train.backbone.dtype``), and recorded in the bundle's meta
(``meta["dtype"]``); every later load (``checkpoint``, the default of ``RecLM.from_pretrained``) resolves that
same setting on the device it loads to: a LoRA checkpoint trained with ``auto`` on a GPU (bf16 base) loads in
fp32 on a CPU.
A stage can override it: the catalog entry's ``load_args: {dtype: ...}``, or ``inference.dtype``.

``autocast`` (decoding and the DPO forward passes): ``auto`` = bf16 autocast on a CUDA device that supports
it and nothing elsewhere, so a CPU run computes in exact fp32 as before; ``off`` = never; ``bfloat16`` /
``float16`` = autocast to that dtype on the model's device, whatever it is (DPO has no loss scaling, so
float16 autocast is for decoding on GPUs without bf16; train with bfloat16 or off).
"""
from __future__ import annotations

import contextlib

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SETTINGS = ("auto", *DTYPES)
LOAD_DTYPE_SETTINGS = ("checkpoint", *DTYPE_SETTINGS)  # checkpoint: the setting recorded in the bundle's meta
AUTOCAST_SETTINGS = ("auto", "off", "bfloat16", "float16")


def check_dtype_setting(setting: object, where: str = "dtype") -> str:
    """``setting`` if it is one of DTYPE_SETTINGS (a torch dtype of DTYPES is taken too, as its name)."""
    if isinstance(setting, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if setting not in names:
            raise ValueError(f"{where}: torch dtype {setting} is not supported; expected one of {list(DTYPES)}")
        return names[setting]
    if setting not in DTYPE_SETTINGS:
        raise ValueError(f"{where} must be one of {list(DTYPE_SETTINGS)}, got {setting!r}")
    return str(setting)


def _cuda_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(setting: object, device: torch.device | str, frozen_base: bool, where: str = "dtype") -> torch.dtype:
    """The torch dtype to load weights in. ``frozen_base``: the weights are a PEFT model's pretrained base,
    which no stage ever trains (``auto`` makes only those bf16, and only on CUDA)."""
    name = check_dtype_setting(setting, where)
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if frozen_base and _cuda_bf16(torch.device(device)) else torch.float32


def check_autocast_setting(setting: object, where: str = "autocast") -> str:
    if setting not in AUTOCAST_SETTINGS:
        raise ValueError(f"{where} must be one of {list(AUTOCAST_SETTINGS)}, got {setting!r}")
    return str(setting)


def autocast(setting: str, device: torch.device | str, where: str = "autocast") -> contextlib.AbstractContextManager:
    """The autocast context of a forward pass on ``device`` (module docstring); a null context when off."""
    name = check_autocast_setting(setting, where)
    device = torch.device(device)
    if name == "off" or (name == "auto" and not _cuda_bf16(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if name in ("auto", "bfloat16") else torch.float16)


def compute_dtype(device: torch.device | str, weights: torch.dtype) -> torch.dtype:
    """The dtype activations have on ``device`` now: the active autocast's, else the weights'. (An additive
    attention mask must match it: a float32 mask beside bf16 queries is rejected by fused attention kernels.)"""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weights
