"""What a run shows and leaves behind: a JSONL log of every step, a progress line on the terminal,
PNG plots of the curves and markdown tables."""

from __future__ import annotations

import json
import math
import os
import sys
import time

__all__ = ["JsonlLog", "Progress", "markdown_table", "plot_curves", "read_jsonl"]


class JsonlLog:
    """Appends one JSON object per line to ``path``, flushed at once (a killed run keeps every
    line written before). ``truncate_after(step)`` drops lines of steps a resumed run repeats."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL log; a last line cut short by a kill is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A one-line progress display: step, loss, tokens/s and the time left. Rewrites the line on
    a terminal; elsewhere (a log file, CI) prints a line every ``every`` steps."""

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        enabled: bool = True,
        every: int = 1,
        stream=None,
        label: str = "",
    ):
        self.total, self.start, self.enabled, self.every = total, start, enabled, every
        self.stream = stream or sys.stderr
        self.label = label
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, step: int, **values) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done else math.inf
        parts = [f"{self.label}step {step}/{self.total}"]
        for key, value in values.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"ETA {_duration(eta) if math.isfinite(eta) else '?'}")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:160])
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` are (key, header, format) triples, the format a
    ``str.format`` spec such as ``".3f"`` ("" for str()); missing values show as a dash."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    series: dict[str, list[tuple[float, float]]],
    path: str,
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
) -> bool:
    """One PNG of named (x, y) curves; False (no file) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if len(points) < 12 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True
