"""Benchmark harness: time and peak memory of an op's implementations on the same inputs.

Each case builds its inputs once, then runs every implementation (fastkd backends and peers such
as torch eager, torch.compile and, on GPU, Liger-Kernel) for warm-up and timed repetitions of
forward+backward. Results are ratios within one run, never absolute claims across machines.

Timing: on CPU each repetition is one ``torch.utils.benchmark.Timer`` call (with the process's
thread count: the Timer's default of one thread would time a different kernel schedule), so
the per-step setup runs untimed; on CUDA ``triton.testing.do_bench`` (its 25 ms warm-up and
100 ms of repetitions, the L2 cache flushed before each), or CUDA events without Triton. A
table reports the median and the interquartile range.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

__all__ = ["Impl", "Result", "add_loss_impl", "format_table", "measure", "write_results"]


@dataclass
class Impl:
    """One implementation: ``make()`` returns a zero-argument step that runs forward+backward
    (or forward only) on the case's inputs and returns the loss."""

    name: str
    make: Callable[[], Callable[[], torch.Tensor]]
    peer: bool = False  # a comparison point rather than a fastkd backend


def add_loss_impl(
    impls: list[Impl],
    forward_only: dict,
    name: str,
    loss_fn: Callable[[], torch.Tensor],
    *,
    peer: bool = False,
) -> None:
    """Adds the implementation ``name`` of a loss to ``impls`` (its step: ``loss_fn()`` then
    backward) and its forward-only step (under no_grad) to ``forward_only``."""

    def train():
        def step():
            loss = loss_fn()
            loss.backward()
            return loss

        return step

    def forward():
        def step():
            with torch.no_grad():
                return loss_fn()

        return step

    impls.append(Impl(name, train, peer=peer))
    forward_only[name] = forward


def recording_step(first: dict, name: str, loss_fn: Callable[[], torch.Tensor]):
    """The step factory of a loss ``name`` (``loss_fn()`` then backward) that records the first
    loss it computes in ``first[name]``, so that a table can show the implementations agree."""

    def make():
        def step():
            loss = loss_fn()
            loss.backward()
            first.setdefault(name, float(loss.detach()))
            return loss

        return step

    return make


@dataclass
class Result:
    impl: str
    peer: bool
    time_ms: float | None = None  # median forward+backward
    time_iqr: tuple[float, float] | None = None  # its 25th and 75th percentiles
    fwd_ms: float | None = None  # median forward only
    peak_mb: float | None = None  # memory above the inputs during forward+backward
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_reset() -> bool:
    """Resets the process's peak resident set size (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) of at least one time."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q1, q3


def _time(
    step: Callable[[], object],
    device: torch.device,
    warmup: int,
    reps: int,
    before_each: Callable[[], None],
) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) of ``step``'s time in ms."""
    if device.type == "cuda":
        return _time_cuda(step, device, warmup, reps, before_each)
    from torch.utils.benchmark import Timer

    timer = Timer(
        stmt="step()",
        setup="before_each()",
        num_threads=torch.get_num_threads(),
        globals={"step": step, "before_each": before_each},
    )
    for _ in range(warmup):
        timer.timeit(1)
    return _quartiles([timer.timeit(1).median * 1e3 for _ in range(reps)])


def _time_cuda(
    step: Callable[[], object],
    device: torch.device,
    warmup: int,
    reps: int,
    before_each: Callable[[], None],
) -> tuple[float, float, float]:
    def run():
        before_each()
        step()

    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        median, q1, q3 = do_bench(run, quantiles=[0.5, 0.25, 0.75])
        return median, q1, q3
    for _ in range(warmup):
        run()
    _sync(device)
    times = []
    for _ in range(reps):
        before_each()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return _quartiles(times)


class PeakMemory:
    """Context manager measuring the peak memory of its block above what was in use when it
    began, in MiB (``.mb`` after the block): the CUDA caching allocator's peak of allocated
    bytes on a CUDA ``device``, else the process's peak resident set (Linux ``VmHWM``, reset at
    the start; ``.mb`` stays None where the kernel cannot reset it)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.mb: float | None = None
        self._base = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            if _rss_peak_reset():
                self._base = _rss_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> bool:
        if self._base is None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self.mb = max(_rss_kb("VmHWM") - self._base, 0) / 1024
        return False


def _release_free_heap() -> None:
    """Returns glibc's free heap pages to the system (best effort): pages that an earlier block
    freed but glibc kept resident would be reused by the next one without raising its peak,
    understating it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_mb(
    step: Callable[[], object], device: torch.device, before_each: Callable[[], None]
) -> float | None:
    before_each()
    with PeakMemory(device) as peak:
        step()
    return peak.mb


def measure(
    impls: list[Impl],
    device: torch.device,
    *,
    warmup: int = 2,
    reps: int = 5,
    forward_only: dict[str, Callable[[], Callable[[], object]]] | None = None,
    before_each: Callable[[], None] = lambda: None,
) -> list[Result]:
    """Times each implementation; a failing one is reported with its error, not raised.

    ``before_each`` runs before every step, outside the timing (e.g. dropping last step's
    gradients, so that the peak memory counts a step's own allocations only).
    """
    results = []
    for impl in impls:
        res = Result(impl.name, impl.peer)
        try:
            step = impl.make()
            res.peak_mb = _peak_mb(step, device, before_each)
            res.time_ms, *iqr = _time(step, device, warmup, reps, before_each)
            res.time_iqr = tuple(iqr)
            if forward_only and impl.name in forward_only:
                res.fwd_ms = _time(forward_only[impl.name](), device, warmup, reps, before_each)[0]
        except Exception as exc:  # a peer that cannot run here is a result, not a crash
            res.error = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            )
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(res)
    return results


def format_table(
    title: str,
    results: list[Result],
    extra_cols: tuple[str, ...] = (),
    time_label: str = "fwd+bwd ms",
) -> str:
    """A markdown table; `vs best peer` is the best peer's median time over this
    implementation's. ``time_label`` names the timed step (forward+backward unless the op has no
    backward); its column gives the median and, in brackets, the interquartile range."""
    peers = [r.time_ms for r in results if r.peer and r.time_ms is not None]
    best_peer = min(peers) if peers else None
    head = ["impl", time_label, "fwd ms", "peak MB", "vs best peer", *extra_cols]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.impl} | failed: {r.error} |" + " |" * (len(head) - 2))
            continue
        ratio = f"{best_peer / r.time_ms:.2f}x" if best_peer and r.time_ms else "-"
        spread = f" [{r.time_iqr[0]:.2f}–{r.time_iqr[1]:.2f}]" if r.time_iqr else ""
        cells = [
            r.impl,
            f"{r.time_ms:.2f}{spread}",
            f"{r.fwd_ms:.2f}" if r.fwd_ms else "-",
            f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-",
            ratio,
            *[str(r.extra.get(c, "-")) for c in extra_cols],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            payload, f, indent=2, default=lambda o: asdict(o) if isinstance(o, Result) else str(o)
        )
