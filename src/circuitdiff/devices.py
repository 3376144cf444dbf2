"""Spreading independent jobs (a study's settings, a trajectory's checkpoints) over devices.

With one device the jobs run here, one after another. With several, each device gets its
own worker process (started with ``spawn``, so CUDA is initialised in the worker), and
the jobs go to whichever worker is free; results come back in the jobs' order. On CPU
the workers share the cores (``torch.set_num_threads`` splits them). The jobs write into
their own files with the usual identity checks, so a spread run resumes as a serial one,
and the other way round.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from circuitdiff.errors import ArgumentError, DistributedError

__all__ = ["check_devices", "map_on_devices"]

#: The worker's device and whether it prints its log (set once per worker by :func:`_take_device`).
_WORKER_DEVICE: str | None = None
_VERBOSE = True


def check_devices(devices: Sequence[str]) -> list[str]:
    """``devices`` checked (known to torch, present on this machine), as a list."""
    from circuitdiff.pipeline import check_device

    devices = list(devices)
    if not devices or not all(isinstance(d, str) and d for d in devices):
        raise ArgumentError(f"devices must be a non-empty list of device names such as ['cuda:0', 'cuda:1']; "
                            f"got {devices!r}.")
    for device in devices:
        check_device(device)
    return devices


def map_on_devices(job: Callable[..., Any], items: Sequence[Any], devices: Sequence[str], *,
                   log: Callable[[str], None] = print, verbose: bool = True,
                   stop_on_error: bool = False) -> list[tuple[Any, BaseException | None]]:
    """``job(item, device, log)`` for every item; ``[(result, None) or (None, error)]`` in item order.

    Args:
        job: a module-level function (it is sent to the workers by reference).
        items: its first arguments (sent to the workers by pickling).
        devices: one worker per device; with one, everything runs in this process.
        log: this process's log; a worker prints its lines prefixed with its device.
        verbose: whether workers print their log lines at all.
        stop_on_error: raise the first error (in item order) and cancel the jobs not
            started, instead of returning it.

    Otherwise an error in a job is returned, not raised, so the caller decides what it
    means; ``KeyboardInterrupt`` is raised. A worker that dies (killed, out of memory)
    fails the jobs it had not finished with a :class:`~circuitdiff.errors.DistributedError`.
    """
    devices = list(devices)
    outcomes: list[tuple[Any, BaseException | None]] = []
    if len(devices) == 1:
        for item in items:
            try:
                outcomes.append((job(item, devices[0], log), None))
            except Exception as exc:  # noqa: BLE001 - returned to the caller, which decides
                if stop_on_error:
                    raise
                outcomes.append((None, exc))
        return outcomes
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for device in devices:
        queue.put(device)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    pool = ProcessPoolExecutor(len(devices), mp_context=context, initializer=_take_device,
                               initargs=(queue, threads, verbose))
    try:
        futures = [pool.submit(_run_job, job, item) for item in items]
        for future in futures:
            try:
                outcomes.append((future.result(), None))
            except BrokenProcessPool:
                error = DistributedError("a worker process died (killed, or out of memory) before this job finished; "
                                         "run again to resume.")
                if stop_on_error:
                    raise error from None
                outcomes.append((None, error))
            except Exception as exc:  # noqa: BLE001 - returned to the caller, which decides
                if stop_on_error:
                    raise
                outcomes.append((None, exc))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def _take_device(queue: Any, threads: int, verbose: bool) -> None:
    """Worker start-up: claim one device; on CPU, take a share of the cores; quiet unless ``verbose``."""
    global _WORKER_DEVICE, _VERBOSE
    import torch

    _WORKER_DEVICE, _VERBOSE = queue.get(), verbose
    if not verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its checkpoint-loading bars, as the CLI's --quiet does
    if _WORKER_DEVICE.startswith("cuda"):
        torch.cuda.set_device(_WORKER_DEVICE)
    elif _WORKER_DEVICE == "cpu":
        torch.set_num_threads(threads)


def _run_job(job: Callable[..., Any], item: Any) -> Any:
    device = _WORKER_DEVICE
    return job(item, device, (lambda line: print(f"[{device}] {line}", flush=True)) if _VERBOSE else _quiet)


def _quiet(line: str) -> None:
    """A log that drops its lines."""
