"""Spreading jobs over devices: results in order, errors returned or raised, logs forwarded, workers stopped."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import circuitdiff as cd
from circuitdiff.devices import check_devices, map_on_devices


class Stubborn(Exception):
    """An exception that cannot be rebuilt from its pickle (its constructor takes two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def job(item, device, log):
    """Item squared with the device, the process and its torch threads; some items fail or hang."""
    if item == 3:
        raise cd.DataError("three is refused")
    if item == 4:
        raise Stubborn("four", "more")
    if item == -1:
        os._exit(1)
    if item == -2:
        time.sleep(120)
    log(f"squaring {item}")
    return item * item, device, os.getpid(), torch.get_num_threads()


def test_one_device_runs_the_jobs_here_in_order_and_returns_their_errors():
    lines = []
    outcomes = map_on_devices(job, [1, 2, 3, 5], ["cpu"], log=lines.append)
    here = (os.getpid(), torch.get_num_threads())
    assert [value for value, _ in outcomes] == [(1, "cpu", *here), (4, "cpu", *here), None, (25, "cpu", *here)]
    assert isinstance(outcomes[2][1], cd.DataError) and lines == ["squaring 1", "squaring 2", "squaring 5"]
    with pytest.raises(cd.DataError, match="three is refused"):
        map_on_devices(job, [1, 3, 5], ["cpu"], log=lines.append, stop_on_error=True)


@pytest.mark.slow  # starts worker processes (each imports torch)
def test_several_devices_get_one_worker_process_each():
    lines = []
    outcomes = map_on_devices(job, [1, 2, 3, 4, 5, 6], ["cpu", "cpu"], log=lines.append, progress=False)
    values = [value for value, _ in outcomes]
    assert [v[0] if v else None for v in values] == [1, 4, None, None, 25, 36]  # the jobs' order
    assert isinstance(outcomes[2][1], cd.DataError) and str(outcomes[2][1]) == "three is refused"
    stubborn = outcomes[3][1]  # sent back as its text, the other jobs unharmed
    assert isinstance(stubborn, cd.DistributedError) and "Stubborn: four and more" in str(stubborn)
    workers = {v[2] for v in values if v}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    cores = len(os.sched_getaffinity(0))
    assert {v[3] for v in values if v} == {max(1, cores // 2)}  # the cores split between the two workers
    assert sorted(lines) == [f"[cpu] squaring {i}" for i in (1, 2, 5, 6)]  # forwarded to this process's log


@pytest.mark.slow  # starts worker processes
def test_a_dead_worker_is_reported_and_an_interrupt_stops_the_workers():
    dead = map_on_devices(job, [-1], ["cpu", "cpu"], progress=False)
    assert dead[0][0] is None and isinstance(dead[0][1], cd.DistributedError)
    # Ctrl-C to this process only (a notebook's interrupt); Python's handler installed even where the shell that
    # started the tests ignores SIGINT (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            map_on_devices(job, [-2, -2, -2], ["cpu", "cpu"], progress=False)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 60  # the hanging jobs were stopped, not waited for (120 s each)


def test_devices_are_checked_before_anything_runs():
    assert check_devices(("cpu", "cpu")) == ["cpu", "cpu"]
    with pytest.raises(cd.ArgumentError, match="non-empty list"):
        check_devices([])
    with pytest.raises(cd.ArgumentError, match="unknown device"):
        check_devices(["cpu", "gpu7"])
    with pytest.raises(cd.ArgumentError, match="not available|does not exist"):  # no GPU here, or not that many
        check_devices(["cpu", "cuda:999"])
    if torch.cuda.is_available():
        with pytest.raises(cd.ArgumentError, match="mix the kinds"):
            check_devices(["cpu", "cuda:0"])


def test_mixed_device_kinds_are_refused(monkeypatch):
    from circuitdiff import pipeline

    monkeypatch.setattr(pipeline, "check_device", lambda device: None)  # as if this machine had a GPU
    with pytest.raises(cd.ArgumentError, match=r"mix the kinds \['cpu', 'cuda'\].*one kind"):
        check_devices(["cpu", "cuda:0"])
