"""Conversion progress: each step shown live (rich) and logged with its outcome and time."""

from __future__ import annotations

import logging

import pytest

from converter import progress


def test_steps_are_logged_with_their_outcome(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="medge.convert")
    progress.enable(live=True)
    try:
        with progress.step("LiteRT conversion (strategies: full-int8)"):
            pass
        with pytest.raises(RuntimeError, match="boom"), progress.step("calibration check"):
            raise RuntimeError("boom")
    finally:
        progress.disable()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("LiteRT conversion (strategies: full-int8): done in ") for m in lines)
    assert any(m.startswith("calibration check: failed in ") for m in lines)


def test_without_a_terminal_nothing_is_drawn(capsys: pytest.CaptureFixture[str]) -> None:
    progress.enable()  # stderr is captured here, not a terminal: log lines only
    with progress.step("evaluating model_int8.tflite"):
        pass
    progress.disable()
    assert capsys.readouterr().err == ""
