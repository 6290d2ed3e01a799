"""The results a finished ``distill`` run leaves in its output folder: ``results.json``,
``results.md`` (training tokens/s and the held-out evaluations as a table) and the plots of the
training loss and the held-out curves.
"""

from __future__ import annotations

import os

from .config import Config
from .report import markdown_table, plot_curves, read_jsonl
from .run_files import write_json_atomic


def _write_report(config: Config, out: str, evals: list[dict], log_path: str, result: dict) -> None:
    c = config
    records = read_jsonl(log_path)
    write_json_atomic(os.path.join(out, "results.json"), result)
    columns = [
        ("step", "step", ""),
        ("ce", "held-out CE", ".4f"),
        ("ppl", "ppl", ".2f"),
        ("kl", "KL(teacher||student)", ".4f"),
        ("agreement", "top-1 agreement", ".3f"),
        ("ece", "ECE", ".4f"),
        ("tokens", "eval tokens", ""),
    ]
    table = (
        markdown_table(evals, columns)
        if evals
        else "No held-out evaluation: the held-out split has no labelled token."
    )
    speed = result["tokens_per_s"]
    header = (
        f"# {c.objective.kind} run: {os.path.basename(os.path.abspath(out))}\n\n"
        f"Training tokens/s: {'-' if speed is None else f'{speed:.0f}'}\n\n"
    )
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(header + table + "\n")
    if c.output.plots:
        plot_curves(
            {"train loss": [(r["step"], r["loss"]) for r in records]},
            os.path.join(out, "train_loss.png"),
            title="training loss",
            ylabel="nats per token",
        )
        if evals:
            series = {"held-out CE": [(e["step"], e["ce"]) for e in evals]}
            if "kl" in evals[0]:
                series["KL(teacher||student)"] = [(e["step"], e["kl"]) for e in evals]
            plot_curves(
                series,
                os.path.join(out, "eval.png"),
                title="held-out",
                ylabel="nats per token",
            )
