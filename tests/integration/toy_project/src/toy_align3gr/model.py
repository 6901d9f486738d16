"""A linear scorer over one-hot SCID codes: the toy stand-in for a checkpointed model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class ToyScorer:
    def __init__(self, weights: np.ndarray, levels: int, codebook_size: int) -> None:
        self.weights = weights
        self.levels = levels
        self.codebook_size = codebook_size

    def features(self, codes: np.ndarray) -> np.ndarray:
        x = np.zeros((len(codes), self.levels * self.codebook_size + 1))
        for level in range(self.levels):
            x[np.arange(len(codes)), level * self.codebook_size + codes[:, level]] = 1.0
        x[:, -1] = 1.0
        return x

    def predict(self, codes: np.ndarray) -> np.ndarray:
        return self.features(codes) @ self.weights

    def save_pretrained(self, path: str) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "weights.npy", self.weights)
        (out / "config.json").write_text(json.dumps({"levels": self.levels, "codebook_size": self.codebook_size}))

    @classmethod
    def from_pretrained(cls, path: str) -> "ToyScorer":
        config = json.loads((Path(path) / "config.json").read_text())
        return cls(np.load(Path(path) / "weights.npy"), **config)
