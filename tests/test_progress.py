"""Progress output: bars on a terminal, plain lines elsewhere, and nothing drawn after a failure."""

import io

import pytest

from resnetlab.training.progress import EpochProgress, RunProgress, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]


def test_epoch_progress_off_a_terminal_writes_plain_lines():
    stream = io.StringIO()
    bar = EpochProgress(1, 3, steps=4, stream=stream, log_seconds=0)
    for _ in range(4):
        bar.update(0.5, 0.25, 100.0)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 3  # steps 1..3; the epoch's own summary line reports the last one
    assert lines[0].startswith("epoch 1/3 step 1/4 loss 0.5000 acc 25.00% 100 img/s")


def test_run_progress_off_a_terminal_writes_plain_lines():
    stream = io.StringIO()
    with RunProgress(3, "demo", stream=stream, log_seconds=3600) as bar:
        for _ in range(3):
            bar.update()
    # throttled: only the final line, since an hour has not passed
    assert stream.getvalue().splitlines() == ["demo: 3/3 runs done in 0s"]


def test_run_progress_disabled_writes_nothing():
    stream = Terminal()
    with RunProgress(2, "demo", stream=stream, enabled=False) as bar:
        bar.update(2)
    assert stream.getvalue() == ""


def test_run_progress_erases_its_bar_when_the_study_fails():
    stream = Terminal()
    with pytest.raises(RuntimeError), RunProgress(3, "identity", stream=stream) as bar:
        bar.update()
        raise RuntimeError("boom")
    # whatever the bar drew, what follows its last carriage return is blank: an error printed next
    # is the last thing on screen
    assert "identity" in stream.getvalue()
    assert stream.getvalue().rsplit("\r", 1)[-1].strip() == ""


def test_run_progress_keeps_its_bar_when_the_study_succeeds():
    stream = Terminal()
    with RunProgress(1, "identity", stream=stream) as bar:
        bar.update()
    assert "identity: 100%" in stream.getvalue().rsplit("\r", 1)[-1]
