"""The entry point's warning filters silence exactly the named third-party warnings: same category, same
issuing module, same message; a neighbour that differs in any of the three still gets through."""
from __future__ import annotations

import logging
import warnings

import pytest

from align3gr_pipelines.tracking import warning_filters
from align3gr_pipelines.tracking.warning_filters import KNOWN_THIRD_PARTY_WARNINGS

RESOLVER = "register_new_resolver() is deprecated and will be removed in a future release."


def _emitted(message: str, category: type[Warning], module: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        warning_filters.install()
        warnings.warn_explicit(message, category, f"/site-packages/{module.replace('.', '/')}.py", 1, module=module)
    return caught


@pytest.mark.parametrize(
    "message, category, module",
    [
        (RESOLVER, UserWarning, "kedro.config.omegaconf_config"),
        (RESOLVER, UserWarning, "kedro_mlflow.framework.hooks.mlflow_hook"),
        ("\x1b[33mAdd type hints to the `predict` method to enable data validation", UserWarning,
         "mlflow.pyfunc.utils.data_validation"),
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, "transformers.modeling_utils"),
    ],
)
def test_known_warnings_are_silenced(message, category, module):
    assert _emitted(message, category, module) == []


@pytest.mark.parametrize(
    "message, category, module",
    [
        (RESOLVER, UserWarning, "align3gr_pipelines.settings"),  # another module
        (RESOLVER, DeprecationWarning, "kedro.config.omegaconf_config"),  # another category
        ("some other kedro warning", UserWarning, "kedro.config.omegaconf_config"),  # another message
        (RESOLVER, UserWarning, "kedro.config.omegaconf_config_extra"),  # module names are matched whole
        ("`past_key_values` is deprecated", FutureWarning, "transformers.modeling_utils"),
    ],
)
def test_neighbouring_warnings_still_show(message, category, module):
    assert len(_emitted(message, category, module)) == 1


def test_the_log_filter_drops_only_known_records():
    warning_filters.install()
    warning_filters.install()  # idempotent
    log = logging.getLogger("py.warnings")
    drop = [f for f in log.filters if isinstance(f, warning_filters._DropKnownWarnings)]
    assert len(drop) == 1

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, "%s", (text,), None)

    known = ("/x/site-packages/mlflow/pyfunc/utils/data_validation.py:187: UserWarning: \x1b[33mAdd type hints to "
             "the `predict` method to enable data validation\n  color_warning(\n")
    assert not drop[0].filter(record(known))
    assert drop[0].filter(record(known.replace("UserWarning", "FutureWarning")))
    assert drop[0].filter(record("/x/site-packages/mlflow/other.py:1: UserWarning: Add type hints to the `predict` method"))
    assert len(KNOWN_THIRD_PARTY_WARNINGS) == len(drop[0].patterns)
