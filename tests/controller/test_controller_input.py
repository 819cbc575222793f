"""EMG chunks the controller cannot use are counted and dropped, never raised out of its loop."""

from __future__ import annotations

import numpy as np
import pytest

from controller.loop import Controller
from fesloop.config import load_config
from fesloop.protocol import EmgChunk


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("edit", "needed"), [({}, 2), ({"post_ms = 20.0": "post_ms = 20.0\nsync_channel = 4"}, 5)])
def test_a_chunk_narrower_than_the_muscles_and_sync_channel_need_is_counted_and_dropped(
    write_config, edit: dict, needed: int
) -> None:
    """A sync channel beyond the board's columns made the estimator index past the chunk and
    killed the controller; now the chunk is rejected like one missing a muscle's column."""
    controller = Controller(load_config(write_config("demo.toml", edit)))
    try:
        now_s = controller.rt.clock.now()
        for n_columns in (needed - 1, needed):
            controller.on_emg(EmgChunk(0, now_s, now_s, 2000.0, np.zeros((4, n_columns), np.float32)), now_s)
        counters = controller.emg_link.counters
    finally:
        controller.rt.close()
    assert counters.rejected == 1
    assert counters.last_error == f"EMG has {needed - 1} channels, muscles and sync channel need {needed}"
    assert controller.estimator is not None  # the wide enough chunk was processed
