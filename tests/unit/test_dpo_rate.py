"""pairs_per_second is a rate over a measurable duration, or null: never 2.6e11 pairs/s from a zero clamp."""
from __future__ import annotations

import math
import time

import pytest

from align3gr_pipelines.preference.dpo_trainer import MIN_RATE_TICKS, rate_per_second


def test_a_measured_duration_gives_the_rate() -> None:
    assert rate_per_second(8, 0.04) == pytest.approx(200.0)
    assert rate_per_second(256, 2.0, resolution=1e-3) == pytest.approx(128.0)


@pytest.mark.parametrize("seconds", [0.0, -1.2236220530003266, -0.0, math.nan, math.inf, -math.inf])
def test_no_rate_over_a_zero_negative_or_undefined_duration(seconds: float) -> None:
    # -1.22 s is the train_seconds that once gave pairs_per_second = 2.56e11 with max(seconds, 1e-9).
    assert rate_per_second(256, seconds) is None


def test_no_rate_below_the_clock_resolution() -> None:
    tick = time.get_clock_info("perf_counter").resolution
    assert rate_per_second(256, tick / 2) is None
    assert rate_per_second(256, (MIN_RATE_TICKS - 1) * tick) is None
    assert rate_per_second(256, MIN_RATE_TICKS * tick) == pytest.approx(256 / (MIN_RATE_TICKS * tick))
    # A coarse clock (15.6 ms ticks, as on some Windows machines): 0.5 s is under 100 ticks.
    assert rate_per_second(256, 0.5, resolution=0.0156) is None
    assert rate_per_second(256, 2.0, resolution=0.0156) == pytest.approx(128.0)
