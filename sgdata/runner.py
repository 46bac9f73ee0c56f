"""Run shard tasks in this process or on Ray, behind one interface.

`runner.run(tasks, fn, on_done)` calls `fn(task)` for every task and `on_done(task, result)` on the
driver as results arrive, and returns the tasks that still failed after their retries. A failed task
is never dropped silently: the caller reports it and exits non-zero, the other shards are kept.

Ray is imported only inside `RayRunner.run`, so the library works without it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from sgdata.cluster import check_cluster
from sgdata.format.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class FailedTask:
    task: Any
    error: str  # "ExceptionType: message" of the last attempt


class Runner(Protocol):
    def run(
        self, tasks: Sequence[Any], fn: Callable[[Any], Any], on_done: Callable[[Any, Any], None]
    ) -> list[FailedTask]: ...


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the worker's exception
    text = f"{type(cause).__name__}: {cause}".strip()
    return text.splitlines()[0][:500] if text else type(cause).__name__


class InProcessRunner:
    """`--workers 0`: run every task here, in order; no Ray, easiest to debug."""

    startup_seconds = 0.0

    def __init__(self, retries: int = 0):
        self.retries = retries

    def run(self, tasks, fn, on_done) -> list[FailedTask]:
        failed = []
        for task in tasks:
            for attempt in range(self.retries + 1):
                try:
                    result = fn(task)
                except Exception as e:  # a shard's fault must not stop the others
                    if attempt == self.retries:
                        logger.debug("shard task %s failed", getattr(task, "index", task), exc_info=True)
                        failed.append(FailedTask(task, _describe(e)))
                else:
                    on_done(task, result)
                    break
        return failed


def _call(fn, task):
    """The Ray task body: module-level so workers import it by name."""
    return fn(task)


class RayRunner:
    """One Ray task per shard on a local Ray (started and stopped here) or a cluster (joined by address).

    Worker crashes are retried by Ray (`max_retries`); exceptions raised by a task are resubmitted
    here up to `retries` times. At most `max_in_flight` tasks are queued at once, so the driver's
    memory stays bounded for corpora with many shards.
    """

    def __init__(self, num_cpus: int | None = None, address: str | None = None, retries: int = 2,
                 max_in_flight: int | None = None):
        self.num_cpus = num_cpus
        self.address = address
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.startup_seconds = 0.0  # time to start or join Ray in the last run (reported apart from work)

    def _start(self):
        import ray

        if ray.is_initialized():  # a caller (notebook, test) owns Ray: use it, leave it running
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        quiet = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        try:
            if self.address:
                check_cluster(self.address)  # one sentence for a head that will not take us (auth, address)
                ray.init(address=self.address, logging_level="WARNING")
            else:
                ray.init(address="local", num_cpus=self.num_cpus, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise UserError(f"Could not start or join {where}: {_describe(e)}.") from e
        return True

    def run(self, tasks, fn, on_done) -> list[FailedTask]:
        import ray

        if not tasks:
            return []
        start = time.perf_counter()
        started = self._start()
        try:
            if started:  # workers start after ray.init returns: wait for them here, so start-up is not counted as build time
                ray.get([ray.remote(num_cpus=1)(_warm_up).remote() for _ in range(int(self.num_cpus or 1))])
            self.startup_seconds = time.perf_counter() - start
            remote = ray.remote(num_cpus=1, max_retries=3)(_call)
            fn_ref = ray.put(fn)
            total_cpus = int(ray.cluster_resources().get("CPU", 1))
            window = self.max_in_flight or max(2 * total_cpus, 4)
            queue = deque((i, 0) for i in range(len(tasks)))
            pending: dict[Any, tuple[int, int]] = {}
            failed: list[FailedTask] = []
            while queue or pending:
                while queue and len(pending) < window:
                    i, attempt = queue.popleft()
                    pending[remote.remote(fn_ref, tasks[i])] = (i, attempt)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i, attempt = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # task exception, worker crash after Ray's retries, lost node
                        if attempt < self.retries:
                            queue.appendleft((i, attempt + 1))
                        else:
                            failed.append(FailedTask(tasks[i], _describe(e)))
                    else:
                        on_done(tasks[i], result)
            return failed
        finally:
            if started:
                ray.shutdown()


def _warm_up() -> None:
    """Runs once per local worker before the shards: the worker process is up and has imported the
    modules every shard task needs."""
    import sgdata.samples  # noqa: F401
    import sgdata.writer  # noqa: F401


def make_runner(workers: int | None, ray_address: str | None, retries: int = 2) -> Runner:
    """`workers=0`: in-process; `None`: every core; an address (argument or RAY_ADDRESS) joins a cluster."""
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}.")
    if workers == 0:
        if ray_address:
            raise UserError("--workers 0 runs in-process and cannot be combined with --ray-address.")
        return InProcessRunner()
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        # on a cluster the CPUs are the cluster's; --workers then caps the shards in flight
        return RayRunner(address=address, retries=retries, max_in_flight=workers)
    return RayRunner(num_cpus=workers or os.cpu_count() or 1, retries=retries)


class ShardProgress:
    """The driver's progress line: shards done / total, samples written, images per second.

    Drawn with rich on a terminal; silent otherwise (logs of batch jobs get the final summary).
    """

    def __init__(self, total_shards: int, enabled: bool = True):
        self.total = total_shards
        self.enabled = enabled and sys.stderr.isatty()
        self.samples = 0
        self.start = time.perf_counter()
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("build", total=self.total, rate="")
        return self

    def advance(self, samples: int) -> None:
        self.samples += samples
        if self._progress is not None:
            seconds = max(time.perf_counter() - self.start, 1e-9)
            rate = f"{self.samples} samples, {self.samples / seconds:.1f} images/s"
            self._progress.update(self._task, advance=1, rate=rate)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
