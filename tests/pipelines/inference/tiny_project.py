"""A trained-project stand-in for the inference tests: the real conf/ and pyproject.toml, and a data/ tree
holding what training leaves behind (items, SCID tables, LM checkpoints), from the DPO tests' tiny world.
The checkpoints are from-config tiny Llamas (the decoding and packaging under test do not depend on how
well they were trained), each stage with its own seed so their lists differ."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from align3gr_pipelines.datasets import CheckpointDataset
from tests.pipelines.sp_dpo_curriculum.tiny_world import TinyWorld, make_rec_lm, make_world

REPO = Path(__file__).resolve().parents[3]
# Saved checkpoints (directory under 06_models -> init seed); sp_dpo_easy is the newest stage present.
STAGES = {"sft_model": 1, "sp_dpo_easy": 2}
REQUESTS = pd.DataFrame({
    "request_id": ["a", "b", "c", "d"],
    "user_id": ["u1", None, "u3", "stranger"],
    "history": [["it1", "it2", "it3"], ["it5"], [f"it{i}" for i in range(15)], ["it7", "it7"]],
    "k": [5, 3, None, 12],
})


def items_table(world: TinyWorld) -> pd.DataFrame:
    ids = world.item_scids["id"].astype(str)
    return pd.DataFrame({"item_id": ids, "title": "Title of " + ids, "description": "", "brand": "", "categories": "", "text": ids})


def save_checkpoints(world: TinyWorld, models_dir: Path, stages: dict[str, int] = STAGES) -> None:
    for name, seed in stages.items():
        CheckpointDataset(str(models_dir / name), "align3gr_pipelines.lm.rec_lm.RecLM").save(make_rec_lm(world.policy.tokenizer, seed))


def make_project(root: Path, requests: pd.DataFrame = REQUESTS) -> tuple[Path, TinyWorld]:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "conf" / "base", root / "conf" / "base")
    (root / "conf" / "local").mkdir()
    (root / "src").mkdir()  # kedro wants the source dir; the package itself is the installed one
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    world = make_world()
    data = root / "data"
    for layer in ("01_raw", "02_intermediate", "05_model_input", "06_models"):
        (data / layer).mkdir(parents=True)
    items_table(world).to_parquet(data / "02_intermediate" / "items.parquet", index=False)
    world.item_scids.to_parquet(data / "05_model_input" / "item_scids.parquet", index=False)
    world.user_scids.to_parquet(data / "05_model_input" / "user_scids.parquet", index=False)
    requests.to_parquet(data / "01_raw" / "inference_requests.parquet", index=False)
    save_checkpoints(world, data / "06_models")
    return root, world
