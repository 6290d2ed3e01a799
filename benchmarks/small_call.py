"""The cost of a small call: ``fastkd.kd_loss`` on 8 x 64 fp32 logits under ``torch.no_grad``,
against the same loss in plain PyTorch (``F.kl_div`` of two ``log_softmax``), in one run.

At this size the kernel's work is a few microseconds; what is measured is the Python between the
call and the kernel (checks, backend choice, argument packing) against PyTorch's own overhead.

    python benchmarks/small_call.py [--rows 8] [--vocab 64] [--seconds 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fastkd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per implementation")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(args.rows, args.vocab, generator=g)
    teacher = torch.randn(args.rows, args.vocab, generator=g)

    def plain():
        return F.kl_div(
            F.log_softmax(student, -1),
            F.log_softmax(teacher, -1),
            log_target=True,
            reduction="batchmean",
        )

    impls = {"plain PyTorch": plain, "fastkd.kd_loss": lambda: fastkd.kd_loss(student, teacher)}
    torch.testing.assert_close(impls["fastkd.kd_loss"](), plain())
    medians = {}
    threads = torch.get_num_threads()
    print(f"kd_loss fkl {args.rows} x {args.vocab} fp32 under no_grad, {threads} threads")
    with torch.no_grad():
        for name, fn in impls.items():
            timer = benchmark.Timer("fn()", globals={"fn": fn})
            m = timer.blocked_autorange(min_run_time=args.seconds)
            medians[name] = m.median
            print(f"{name:>16}: median {m.median * 1e6:7.1f} us, IQR {m.iqr * 1e6:5.1f} us")
    ratio = medians["fastkd.kd_loss"] / medians["plain PyTorch"]
    print(f"fastkd / plain: {ratio:.2f}")


if __name__ == "__main__":
    main()
