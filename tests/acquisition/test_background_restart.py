"""Reopening a source in the worker thread: every failure comes back as a SourceError."""

from __future__ import annotations

from pathlib import Path

import pytest

from acquisition.brainflow_source import BrainFlowSource
from acquisition.loop import BackgroundRestart
from acquisition.sources import SourceError
from fesloop.config import parse_config


def synthetic_recording_to(record_file: Path) -> BrainFlowSource:
    return BrainFlowSource(parse_config(
        f'[acquisition]\nsource = "brainflow"\n[acquisition.brainflow]\nrecord_file = "{record_file}"\n'
        '[[muscles]]\nname = "a"\nemg_channel = 0\nrest_uv = 1.0\nmvc_uv = 60.0\n'
    ))


@pytest.mark.timeout(30)
def test_a_record_file_whose_folder_cannot_be_made_is_a_source_error_at_start_and_reopen(tmp_path: Path) -> None:
    """A file sits where the record file's folder should be: start() raises SourceError naming
    record_file (the process reports it and exits 2 instead of a traceback), and a reopening in the
    worker thread ends with that error (it was logged as a successful reopening)."""
    (tmp_path / "taken").write_text("a file, not a folder\n")
    source = synthetic_recording_to(tmp_path / "taken" / "session.csv")
    restart = BackgroundRestart(source)
    try:
        with pytest.raises(SourceError, match="acquisition.brainflow.record_file: cannot create its folder"):
            source.start(0.0)
        restart.start(0.0)
        assert restart.join(10.0)
        done, error = restart.finished()
    finally:
        source.stop()
    assert done and isinstance(error, SourceError) and "record_file" in str(error)


class FailingReopen:
    """A source whose reopening fails with an error that is not a SourceError."""

    def restart(self, now_s: float) -> None:
        raise ValueError("driver returned garbage")


@pytest.mark.timeout(10)
def test_an_unexpected_error_in_the_reopening_is_reported_not_taken_for_success() -> None:
    restart = BackgroundRestart(FailingReopen())
    restart.start(0.0)
    assert restart.join(5.0)
    done, error = restart.finished()
    assert done and isinstance(error, SourceError)
    assert str(error) == "reopening failed unexpectedly: ValueError: driver returned garbage"
