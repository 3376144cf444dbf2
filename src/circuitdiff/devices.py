"""Spreading independent jobs (a study's settings, a trajectory's checkpoints) over devices.

With one device the jobs run here, one after another. With several, each device gets its
own worker process (started with ``spawn``, so CUDA is initialised in the worker), and
the jobs go to whichever worker is free; results come back in the jobs' order and the
workers' log lines go to this process's ``log``, prefixed with their device. On CPU the
workers share the cores (``torch.set_num_threads`` splits them). The jobs write into
their own files with the usual identity checks, so a spread run resumes as a serial one,
and the other way round.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from circuitdiff.errors import ArgumentError, DistributedError

__all__ = ["check_devices", "map_on_devices"]

#: The worker's device and the queue its log lines go to (set once per worker by :func:`_start_worker`).
_WORKER_DEVICE: str | None = None
_LOG_QUEUE: Any = None


def check_devices(devices: Sequence[str]) -> list[str]:
    """``devices`` checked (known to torch, present on this machine, of one kind), as a list.

    One kind (all CUDA, or all CPU): the default dtype depends on it (bfloat16 on CUDA,
    float32 on CPU), and one run must not score some models in each.
    """
    import torch

    from circuitdiff.pipeline import check_device

    devices = list(devices)
    if not devices or not all(isinstance(d, str) and d for d in devices):
        raise ArgumentError(f"devices must be a non-empty list of device names such as ['cuda:0', 'cuda:1']; "
                            f"got {devices!r}.")
    for device in devices:
        check_device(device)
    kinds = sorted({torch.device(d).type for d in devices})
    if len(kinds) > 1:
        raise ArgumentError(f"devices {devices} mix the kinds {kinds}; use devices of one kind, so every model is "
                            "run in the same precision.")
    return devices


def map_on_devices(job: Callable[..., Any], items: Sequence[Any], devices: Sequence[str], *,
                   log: Callable[[str], None] = print, progress: bool = True,
                   stop_on_error: bool = False) -> list[tuple[Any, BaseException | None]]:
    """``job(item, device, log)`` for every item; ``[(result, None) or (None, error)]`` in item order.

    Args:
        job: a module-level function (it is sent to the workers by reference).
        items: its first arguments (sent to the workers by pickling; keep them small).
        devices: one worker per device; with one, everything runs in this process.
        log: where log lines go; a worker's lines come here prefixed with its device.
        progress: whether workers show transformers' loading bars.
        stop_on_error: raise the first error (in item order) and cancel the jobs not
            started, instead of returning it.

    Otherwise an error in a job is returned, not raised, so the caller decides what it
    means. ``KeyboardInterrupt`` stops the workers and is raised. A worker that dies
    (killed, out of memory) breaks the pool: every job not finished by then fails with a
    :class:`~circuitdiff.errors.DistributedError`.
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
    device_queue, log_queue = context.Queue(), context.Queue()
    for device in devices:
        device_queue.put(device)
    printer = threading.Thread(target=_forward_lines, args=(log_queue, log), daemon=True)
    printer.start()
    threads = max(1, len(os.sched_getaffinity(0)) // len(devices))
    pool = ProcessPoolExecutor(len(devices), mp_context=context, initializer=_start_worker,
                               initargs=(device_queue, log_queue, threads, progress))
    try:
        futures = [pool.submit(_run_job, job, item) for item in items]
        for future in futures:
            try:
                outcomes.append((future.result(), None))
            except BrokenProcessPool as exc:
                error = DistributedError("a worker process died (killed, out of memory, or it could not start) before "
                                         "this job finished; run again to resume.")
                error.__cause__ = exc
                if stop_on_error:
                    raise error
                outcomes.append((None, error))
            except Exception as exc:  # noqa: BLE001 - returned to the caller, which decides
                if stop_on_error:
                    raise
                outcomes.append((None, exc))
    except BaseException:
        for process in list(pool._processes.values()):  # no public way to stop running jobs before Python 3.14
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        log_queue.put(None)
        printer.join()
    return outcomes


def _forward_lines(queue: Any, log: Callable[[str], None]) -> None:
    """Hand the workers' log lines to ``log`` until the closing ``None``."""
    while (line := queue.get()) is not None:
        log(line)


def _start_worker(devices: Any, lines: Any, threads: int, progress: bool) -> None:
    """Worker start-up: claim one device; on CPU, take a share of the cores; quiet bars unless ``progress``."""
    global _WORKER_DEVICE, _LOG_QUEUE
    import torch

    _WORKER_DEVICE, _LOG_QUEUE = devices.get(), lines
    kind = torch.device(_WORKER_DEVICE).type
    if kind == "cuda":
        torch.cuda.set_device(_WORKER_DEVICE)
    elif kind == "cpu":
        torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its checkpoint-loading bars, as the CLI's --quiet does


def _run_job(job: Callable[..., Any], item: Any) -> Any:
    """Run one job in a worker; an error that would not survive the trip back is sent as its text."""
    device = _WORKER_DEVICE
    try:
        return job(item, device, lambda line: _LOG_QUEUE.put(f"[{device}] {line}"))
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - any failure to round-trip
            raise DistributedError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None
        raise
