"""Known, harmless third-party warnings that the main job's log would otherwise repeat on every run.

Each entry names the warning's category, the module that issues it and the start of its message, so that
anything else (a new deprecation, a warning about our own data or models) still reaches the log. None of
them is caused by a call our code makes; those we fix at the source instead. `install()` runs at the
project's entry points (``settings.py``, which Kedro imports before it loads plugin commands, and
``__main__``); tests/e2e/test_clean_log.py runs the main job and fails on any warning left in its log.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    category: type[Warning]
    module: str  # regex on the issuing module's name, anchored at both ends
    message: str  # regex on the start of the message
    why: str


KNOWN_THIRD_PARTY_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        UserWarning,
        r"kedro\.config\.omegaconf_config|kedro_mlflow\.framework\.hooks\.mlflow_hook",
        r"register_new_resolver\(\) is deprecated",
        "OmegaConf 2.4 deprecates register_new_resolver, which Kedro's config loader and kedro-mlflow still call "
        "for their own resolvers (and for ours, passed as custom_resolvers); nothing to change on our side.",
    ),
    KnownWarning(
        UserWarning,
        r"mlflow\.pyfunc\.utils\.data_validation",
        r"(\x1b\[[0-9;]*m)?Add type hints to the `predict` method",
        "kedro-mlflow defines a pyfunc model class (KedroPipelineModel) without type hints; MLflow warns when "
        "the class is defined, i.e. whenever kedro-mlflow's CLI is loaded. We log no pyfunc model.",
    ),
    KnownWarning(
        FutureWarning,
        r"transformers\.modeling_utils",
        r"`is_gradient_checkpointing` is deprecated",
        "PEFT reads the deprecated alias when it wraps a model; our own code uses is_activation_checkpointing.",
    ),
)


def _record_pattern(known: KnownWarning) -> re.Pattern[str]:
    # How logging.captureWarnings renders a warning: "<path>/<module as path>.py:<line>: <Category>: <message>"
    path = known.module.replace(r"\.", "/")
    return re.compile(rf"(?s).*(?:{path})\.py:\d+: {known.category.__name__}: {known.message}", re.IGNORECASE)


class _DropKnownWarnings(logging.Filter):
    """For warnings a library re-enables around its own call (MLflow wraps its type-hint check in
    ``catch_warnings`` + ``simplefilter("once")``, which outranks any filter of ours): drop the record that
    Kedro's logging makes of the warning, matched on the same category, module and message."""

    patterns = [_record_pattern(k) for k in KNOWN_THIRD_PARTY_WARNINGS]

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.args[0]) if record.args else str(record.msg)
        return not any(p.match(text) for p in self.patterns)


def install() -> None:
    """An 'ignore' filter per known warning, and the same match on the ``py.warnings`` logger that Kedro sends
    warnings to. Idempotent: warnings.filterwarnings drops duplicates, the log filter is added once."""
    for known in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=rf"(?:{known.module})\Z")
    log = logging.getLogger("py.warnings")
    if not any(isinstance(f, _DropKnownWarnings) for f in log.filters):
        log.addFilter(_DropKnownWarnings())
