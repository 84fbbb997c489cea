import time

import pytest

from srcr.exporter.pipeline import StageTimer


def test_stage_accumulates_and_names_the_stage_in_flight():
    timer = StageTimer()
    assert timer.current is None
    with timer.stage("load"):
        assert timer.current == "load"
        with timer.stage("inner"):
            assert timer.current == "inner"
        assert timer.current == "load"
        time.sleep(0.01)
    with timer.stage("load"):
        pass
    assert timer.current is None
    assert timer.seconds["load"] >= 0.01
    assert list(timer.seconds) == ["inner", "load"]


def test_split_replaces_a_stage_by_its_parts_and_keeps_the_total():
    timer = StageTimer()
    timer.seconds = {"load": 1.0, "export": 10.0}
    timer.split("export", {"convert": 3.0, "quantize": 5.0})
    assert timer.seconds == {"load": 1.0, "convert": 3.0, "quantize": 7.0}
    assert sum(timer.seconds.values()) == pytest.approx(11.0)


def test_split_without_parts_keeps_the_stage():
    timer = StageTimer()
    timer.seconds = {"export": 2.0}
    timer.split("export", {})
    assert timer.seconds == {"export": 2.0}
