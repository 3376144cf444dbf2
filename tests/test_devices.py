"""Spreading jobs over devices: results in order, errors returned or raised, a dead worker reported."""

from __future__ import annotations

import os

import pytest

import circuitdiff as cd
from circuitdiff.devices import check_devices, map_on_devices


def square_or_fail(item, device, log):
    """A job: item squared with the device it ran on; 3 fails; -1 kills its worker."""
    if item == 3:
        raise cd.DataError("three is refused")
    if item == -1:
        os._exit(1)
    log(f"squaring {item}")
    return item * item, device, os.getpid()


def test_one_device_runs_the_jobs_here_in_order_and_returns_their_errors():
    lines = []
    outcomes = map_on_devices(square_or_fail, [1, 2, 3, 4], ["cpu"], log=lines.append)
    assert [value for value, _ in outcomes] == [(1, "cpu", os.getpid()), (4, "cpu", os.getpid()), None,
                                                (16, "cpu", os.getpid())]
    assert isinstance(outcomes[2][1], cd.DataError) and lines == ["squaring 1", "squaring 2", "squaring 4"]
    with pytest.raises(cd.DataError, match="three is refused"):
        map_on_devices(square_or_fail, [1, 3, 4], ["cpu"], log=lines.append, stop_on_error=True)


@pytest.mark.slow  # starts worker processes (each imports torch)
def test_several_devices_get_one_worker_process_each_and_a_dead_worker_is_reported():
    outcomes = map_on_devices(square_or_fail, [1, 2, 3, 4, 5, 6], ["cpu", "cpu"], verbose=False)
    values = [value for value, _ in outcomes]
    assert [v[0] if v else None for v in values] == [1, 4, None, 16, 25, 36]  # the jobs' order
    assert isinstance(outcomes[2][1], cd.DataError) and str(outcomes[2][1]) == "three is refused"
    workers = {v[2] for v in values if v}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    dead = map_on_devices(square_or_fail, [-1], ["cpu", "cpu"], verbose=False)
    assert dead[0][0] is None and isinstance(dead[0][1], cd.DistributedError)


def test_devices_are_checked_before_anything_runs():
    assert check_devices(("cpu", "cpu")) == ["cpu", "cpu"]
    with pytest.raises(cd.ArgumentError, match="non-empty list"):
        check_devices([])
    with pytest.raises(cd.ArgumentError, match="unknown device"):
        check_devices(["cpu", "gpu7"])
    with pytest.raises(cd.ArgumentError, match="not available|does not exist"):  # no GPU here, or not that many
        check_devices(["cpu", "cuda:999"])
