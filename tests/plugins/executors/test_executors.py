"""The ``serial`` and ``processes`` executors."""

from __future__ import annotations

import math

import pytest

import skydiff
from skydiff_plugins.executors import ProcessesExecutor, SerialExecutor


def checked_sqrt(value: float) -> float:
    if value < 0:
        msg = f"negative input {value}"
        raise skydiff.InputError(msg)
    return math.sqrt(value)


ITEMS = [4.0, -1.0, 9.0, 16.0]


@pytest.mark.parametrize("cls, config", [
    (SerialExecutor, {}),
    (ProcessesExecutor, {"max_workers": 2}),
])
def test_results_in_order_and_failures_recorded(cls, config):
    executor = cls(cls.ConfigClass(**config))
    result = executor.run(checked_sqrt, ITEMS)
    assert isinstance(result, skydiff.ExecutorResult)
    assert result.results == [2.0, None, 3.0, 4.0]
    assert [type(e) for e in result.errors] == [type(None), skydiff.InputError, type(None),
                                                 type(None)]
    assert result.n_failed == 1
    assert result.metadata["n_items"] == 4


def test_serial_fail_fast_reraises():
    executor = SerialExecutor(SerialExecutor.ConfigClass(fail_fast=True))
    with pytest.raises(skydiff.InputError):
        executor.run(checked_sqrt, ITEMS)


def test_processes_uses_at_most_one_worker_per_item():
    executor = ProcessesExecutor(ProcessesExecutor.ConfigClass(max_workers=8))
    result = executor.run(checked_sqrt, [1.0])
    assert result.results == [1.0]
    assert result.metadata["n_workers"] == 1


def test_empty_input_is_not_an_error():
    assert SerialExecutor().run(checked_sqrt, []).results == []
    assert ProcessesExecutor().run(checked_sqrt, []).results == []


def test_selectable_from_pipeline_config():
    config = skydiff.PipelineConfig()
    config.apply_overrides(["executor.name=processes", "executor.processes.max_workers=1"])
    executor = config.executor.apply()
    assert isinstance(executor, ProcessesExecutor)
    assert executor.config.max_workers == 1
