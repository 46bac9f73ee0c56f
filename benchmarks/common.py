"""What every benchmark shares: the result record, side-by-side timing, child processes, the machine.

Why the benchmarks are built this way:
- Absolute times drift with machine load (the benchmark machine is often shared), so every figure is a
  ratio of two things measured in the same run, alternating between the two sides round by round,
  and each side's figure is the median over rounds.
- Peak memory is a property of a whole process: each configuration whose memory we report runs in a
  fresh child process and reports its own peak resident set size (`peak_rss_bytes`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work"  # scratch space for generated inputs and outputs (git-ignored)
RESULTS = ROOT / "benchmarks" / "results.json"
REQUIRED = ("build_passthrough", "build_resize", "storage", "loader", "train_step_paper", "train_step_tiny", "eval")
LOWER_IS_BETTER = {"storage"}  # bytes: ratio = baseline / ours


def result(name: str, value: float, limit_or_baseline: float, unit: str, **extra: Any) -> dict[str, Any]:
    """One row of results.json; ratio > 1 always means better than the limit/baseline side."""
    if name in LOWER_IS_BETTER:
        ratio = limit_or_baseline / value if value else float("inf")
    else:
        ratio = value / limit_or_baseline if limit_or_baseline else float("inf")
    return {"value": value, "limit_or_baseline": limit_or_baseline, "ratio": round(ratio, 4), "unit": unit, **extra}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from Linux's /proc/self/status (e.g. "VmHWM"), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's own peak resident set size.

    Linux's VmHWM (the high-water mark of this address space) when available: a child's ru_maxrss also
    carries the RSS its parent had when it was spawned (the kernel keeps the larger across exec), so a
    child of a big benchmark driver would report the driver's memory. ru_maxrss (KiB) elsewhere.
    """
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now (Linux VmRSS; 0 where unavailable)."""
    return _status_bytes("VmRSS") or 0


def reset_peak_rss() -> bool:
    """Start this process's VmHWM afresh from its current RSS (Linux: `5` to /proc/self/clear_refs).

    Lets a benchmark report the peak of its timed work alone, not of one-off set-up before it (imports,
    building the model, compiling it). False where the kernel does not support it (the peak then
    covers the whole process).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (Linux /proc; NaN when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def process_tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by a process and its live descendants (Linux /proc)."""
    pid = os.getpid() if pid is None else pid
    children: list[str] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += (task / "children").read_text().split()
    except OSError:
        pass
    return process_cpu_seconds(pid) + sum(process_tree_cpu_seconds(int(c)) for c in children)


def python() -> str:
    return sys.executable


def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(module: str, args: list[str], timeout: float, threads: int | None = None) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process; it prints one JSON object as its last stdout line."""
    proc = subprocess.run(
        [python(), "-m", module, *args], cwd=ROOT, env=child_env(threads), capture_output=True, text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import PIL
    import torch

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        info["memory_gb"] = round(int(mem["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    return info


def fmt(value: float) -> str:
    """Numbers for the table: 3 significant digits, thousands as k/M/G where that reads better."""
    if value == 0 or value != value:
        return str(value)
    magnitude = abs(value)
    for bound, scale, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):  # k from 10,000 up
        if magnitude >= bound:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}" if magnitude >= 1000 else f"{value:.3g}"


def table(results: dict[str, dict[str, Any]], goals: dict[str, float]) -> str:
    """The one printed table (also pasted into docs/benchmarks.md): markdown, so it reads in both places."""
    rows = ["| benchmark | ours | limit / baseline | unit | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        goal = goals.get(name)
        met = "" if goal is None else ("yes" if r["ratio"] >= goal else "**no**")
        rows.append(
            f"| {name} | {fmt(r['value'])} | {fmt(r['limit_or_baseline'])} | {r['unit']} | {r['ratio']:.2f}x | "
            f"{'' if goal is None else f'>= {goal}x'} | {met} |"
        )
    return "\n".join(rows)


def pool_rate(pool, loop, shares: list) -> tuple[float, float]:
    """Run `loop` on each share in a process pool at once; (items/s, CPU seconds per item).

    Each `loop(share)` returns (items done, CPU seconds it spent): the limit loops of the build and
    loader benchmarks both report through this.
    """
    import time

    start = time.perf_counter()
    done = pool.map(loop, shares, chunksize=1)
    seconds = time.perf_counter() - start
    count = sum(n for n, _ in done)
    return count / seconds, sum(cpu for _, cpu in done) / count
