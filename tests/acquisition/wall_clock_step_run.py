"""Read the synthetic board while the wall clock steps: run by test_brainflow_source under
libfaketime, with only the wall clock faked (``DONT_FAKE_MONOTONIC=1``) and its offset read
from ``FAKETIME_TIMESTAMP_FILE`` at every call (``FAKETIME_NO_CACHE=1``).

Usage: python -m tests.acquisition.wall_clock_step_run OFFSET_FILE STEP AT_S RUN_S
(STEP as libfaketime writes it, e.g. ``+2``). Prints one JSON line: every block read
(first index, first sample time, samples, lost, local read time), every source event, and
the local read times at which the source held rows back (see BrainFlowSource).
"""

from __future__ import annotations

import json
import os
import select
import sys
from pathlib import Path

import pylsl

from acquisition.brainflow_source import BrainFlowSource
from fesloop.config import parse_config

SYNTHETIC = '[acquisition]\nsource = "brainflow"\n[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
READ_EVERY_S = 0.002


def run(offset_file: Path, step: str, at_s: float, run_s: float) -> dict:
    source = BrainFlowSource(parse_config(SYNTHETIC))
    source.start(pylsl.local_clock())
    start_s = pylsl.local_clock()
    stepped_s = None
    blocks, events, held_s = [], [], []
    try:
        while pylsl.local_clock() - start_s < run_s:
            if stepped_s is None and pylsl.local_clock() - start_s >= at_s:
                staged = offset_file.with_suffix(".next")  # libfaketime rereads the file at every call: a
                staged.write_text(f"{step}\n")  # write in place could be read half done (+0 again, a step back)
                os.replace(staged, offset_file)
                stepped_s = pylsl.local_clock()
            select.select([], [], [], READ_EVERY_S)  # time.sleep fails under libfaketime
            read_s = pylsl.local_clock()
            for b in source.read(read_s):
                blocks.append([b.first_sample_index, b.first_sample_time_s, len(b.emg_uv), b.lost_samples, read_s])
            if source._held is not None:
                held_s.append(read_s)
            events += [[event.time_s, event.marker] for event in source.take_events()]
    finally:
        source.stop()
    return {"stepped_s": stepped_s, "blocks": blocks, "events": events, "held_s": held_s}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))))
