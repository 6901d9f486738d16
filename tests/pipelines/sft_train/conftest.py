"""Tiny tables, SFT examples and parameters shared by the sft_train tests."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from align3gr_pipelines.pipelines.sft_data.nodes import build_sft_examples
from tests.pipelines.sft_data.toy_data import make_tables

ROOT = Path(__file__).resolve().parents[3]
INPUTS = ["items", "users", "interactions", "train_sequences", "valid", "test", "feedback", "item_scids", "user_scids"]


@pytest.fixture(scope="session")
def toy() -> dict[str, pd.DataFrame]:
    return make_tables(n_users=20, n_items=30, min_len=5, max_len=9, seed=11)


@pytest.fixture(scope="session")
def data_params() -> dict:
    params = yaml.safe_load((ROOT / "conf/base/parameters_sft_data.yml").read_text())["sft_data"]
    params.update(max_train_examples=160, targets_per_user=2, target_stride=1, max_history=5)
    return params


@pytest.fixture(scope="session")
def examples(toy, data_params) -> pd.DataFrame:
    df, _ = build_sft_examples(*(toy[k] for k in INPUTS), data_params, 0)
    return df


def tiny_train_params(output_dir: Path, **trainer) -> dict:
    """The default sft_train parameters shrunk to a model and run that take a second or two."""
    params = copy.deepcopy(yaml.safe_load((ROOT / "conf/base/parameters_sft_train.yml").read_text())["sft_train"])
    params["backbone"]["scratch"].update(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=160,
    )
    params["trainer"].update(
        output_dir=str(output_dir), batch_size=16, eval_batch_size=32, max_steps=6, eval_steps=3, logging_steps=1,
        learning_rate=3e-3, max_eval_examples=16, max_length=160, progress_bar=False, warmup_ratio=0.0,
        model_selection={"metric": "eval_loss"},  # tests of selection by valid recall ask for it
    )
    params["trainer"].update(trainer)
    return params


@pytest.fixture
def train_params(tmp_path) -> dict:
    return tiny_train_params(tmp_path / "work")
