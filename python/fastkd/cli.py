"""The ``fastkd`` command: ``distill``, ``cache``, ``eval``, ``demo``, ``bench`` and ``info``."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys

import torch

from .divergences import DIVERGENCES

__all__ = ["main"]

# What `fastkd bench OP` measures.
_BENCH_OPS = (
    "kd_loss",
    "fused_linear_kd_loss",
    "sample_teacher",
    "sparse_kd_loss",
    "sinkhorn",
    "uld_loss",
    "distill_step",
    "onpolicy",
    "fused_linear_topk",
    "xtok",
)


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(low: float, high: float = math.inf, *, low_open: bool = True, high_open: bool = True):
    """An argparse type: a finite number in the interval from ``low`` to ``high`` (open or
    closed at either end)."""
    interval = (
        f"{'(' if low_open else '['}{low}, "
        f"{'inf' if high == math.inf else high}{')' if high_open else ']'}"
    )

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}; got {text}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def _device(text: str) -> str:
    """An argparse type: a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                "CUDA is not available here (torch.cuda.is_available() is False: no GPU, or a "
                "CPU build of torch); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"fastkd runs on cpu or cuda devices; got {text!r}")
    return text


def _cmd_info(args) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def _bench_cases(args):
    """(case, function measuring it) for each case that ``fastkd bench OP`` sweeps."""
    from .bench import (
        FusedLinearCase,
        KdCase,
        SampleCase,
        SparseCase,
        run_fused_linear_case,
        run_kd_loss_case,
        run_sample_teacher_case,
        run_sparse_kd_loss_case,
    )

    if args.op == "sample_teacher":
        for rows in args.rows:
            for vocab in args.vocab:
                yield (
                    SampleCase(
                        rows=rows,
                        vocab=vocab,
                        dtype=args.dtype,
                        num_samples=args.num_samples,
                        temperature=args.temperature,
                        device=args.device,
                        method=args.method,
                        k=args.k,
                    ),
                    run_sample_teacher_case,
                )
        return
    if args.op == "sinkhorn":
        from .bench.sinkhorn import SinkhornCase, run_sinkhorn_case

        yield (
            SinkhornCase(
                batch=args.batch,
                n=args.n,
                m=args.m,
                eps=args.eps,
                tol=args.tol,
                max_iters=args.max_iters,
                eps_scaling=args.eps_scaling,
                dtype=args.dtype,
                device=args.device,
                pot_limit=args.pot_limit,
                peers=tuple(args.peers),
            ),
            run_sinkhorn_case,
        )
        return
    if args.op == "sparse_kd_loss":
        for rows in args.rows:
            for vocab in args.vocab:
                yield (
                    SparseCase(
                        rows=rows,
                        vocab=vocab,
                        dtype=args.dtype,
                        num_samples=args.num_samples,
                        device=args.device,
                    ),
                    run_sparse_kd_loss_case,
                )
        return
    if args.op == "distill_step":
        from .bench.distill_step import DistillStepCase, run_distill_step_case

        for rows in args.rows:
            for vocab in args.vocab:
                yield (
                    DistillStepCase(
                        rows=rows,
                        seq_len=args.seq_len,
                        vocab=vocab,
                        student_hidden=args.hidden,
                        teacher_hidden=args.teacher_hidden,
                        beta=args.beta,
                        device=args.device,
                    ),
                    run_distill_step_case,
                )
        return
    if args.op in ("onpolicy", "fused_linear_topk"):
        from .bench.onpolicy import OnpolicyCase, run_onpolicy_case

        for rows in args.rows:
            for vocab in args.vocab:
                yield (
                    OnpolicyCase(
                        kind="loss" if args.op == "onpolicy" else "topk",
                        rows=rows,
                        hidden=args.hidden,
                        vocab=vocab,
                        k=args.k,
                        beta=args.beta,
                        dtype=args.dtype,
                        device=args.device,
                    ),
                    run_onpolicy_case,
                )
        return
    if args.op == "xtok":
        # Alignment throughput, then the GOLD losses at Qwen's and Llama 3's vocabulary sizes.
        from .bench.xtok import XtokAlignCase, XtokGoldCase, run_xtok_align_case, run_xtok_gold_case

        yield XtokAlignCase(device=args.device), run_xtok_align_case
        for hybrid in (False, True):
            yield XtokGoldCase(hybrid=hybrid, device=args.device), run_xtok_gold_case
        return
    if args.op == "uld_loss":
        from .bench.uld_loss import UldCase, run_uld_loss_case

        for rows in args.rows:
            for vocab in args.vocab:
                yield (
                    UldCase(
                        rows=rows,
                        vocab=vocab,
                        teacher_vocab=args.teacher_vocab or vocab,
                        dtype=args.dtype,
                        device=args.device,
                    ),
                    run_uld_loss_case,
                )
        return
    for divergence in args.divergence:
        for rows in args.rows:
            for vocab in args.vocab:
                if args.op == "kd_loss":
                    yield (
                        KdCase(
                            rows=rows,
                            vocab=vocab,
                            dtype=args.dtype,
                            divergence=divergence,
                            beta=args.beta,
                            device=args.device,
                        ),
                        run_kd_loss_case,
                    )
                else:
                    yield (
                        FusedLinearCase(
                            rows=rows,
                            hidden=args.hidden,
                            vocab=vocab,
                            dtype=args.dtype,
                            divergence=divergence,
                            beta=args.beta,
                            teacher=args.teacher,
                            device=args.device,
                        ),
                        run_fused_linear_case,
                    )


def _cmd_bench(args) -> int:
    from .bench.harness import write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    payload = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cases": [],
    }
    if args.device == "cuda":
        payload["gpu"] = torch.cuda.get_device_name()
    tables = []
    for case, run_case in _bench_cases(args):
        results, table = run_case(case, warmup=args.warmup, reps=args.reps)
        print(table + "\n", flush=True)
        tables.append(table)
        payload["cases"].append({"case": case.__dict__, "results": results})
    if args.out:
        write_results(args.out, payload)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join(tables) + "\n")
    return 0


def _train_module():
    try:
        from . import train
    except ImportError as exc:
        raise SystemExit(
            f"fastkd: the trainer needs the [train] extra ({exc}); pip install 'fastkd[train]'"
        ) from None
    return train


def _run_config_command(args, function) -> int:
    train = _train_module()
    from .train.run_files import RunLockedError

    try:
        result = function(args.config, args.set or None)
    except train.ConfigError as exc:
        print(f"fastkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, RunLockedError) as exc:
        # Bad data, models, caches or output folders: the message says which and why.
        print(f"fastkd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, default=str))
    return 0


def _cmd_distill(args) -> int:
    return _run_config_command(args, _train_module().distill)


def _cmd_cache(args) -> int:
    return _run_config_command(args, _train_module().build_cache)


def _cmd_eval(args) -> int:
    train = _train_module()
    return _run_config_command(
        args, lambda config, overrides: train.evaluate_run(config, overrides, model=args.model)
    )


def _cmd_demo(args) -> int:
    from .train.demo import run_demo

    _train_module()
    run_demo(out=args.out, size=args.size, seed=args.seed, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="what this installation compiled (build_info)")

    bench = sub.add_parser(
        "bench", help="time fastkd against torch eager/compile (and Liger on GPU)"
    )
    bench.add_argument(
        "op",
        nargs="?",
        default="kd_loss",
        choices=_BENCH_OPS,
        help="the op to time (default kd_loss)",
    )
    bench.add_argument(
        "--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    bench.add_argument("--rows", type=_int_at_least(1), nargs="+", default=[2048])
    bench.add_argument("--vocab", type=_int_at_least(1), nargs="+", default=[32000])
    bench.add_argument(
        "--hidden",
        type=_int_at_least(1),
        default=256,
        help="hidden size H of the lm_head (fused_linear_kd_loss; the student's in distill_step)",
    )
    bench.add_argument(
        "--teacher-hidden",
        type=_int_at_least(1),
        default=512,
        help="the teacher's hidden size (distill_step; the student's is --hidden)",
    )
    bench.add_argument(
        "--seq-len",
        type=_int_at_least(1),
        default=512,
        help="tokens per sequence; --rows tokens per step (distill_step)",
    )
    bench.add_argument(
        "--teacher",
        default="online",
        choices=["online", "offline"],
        help="teacher as hidden states and an lm_head, or as dense logits (fused_linear_kd_loss)",
    )
    bench.add_argument(
        "--teacher-vocab",
        type=_int_at_least(0),
        default=0,
        help="the teacher's vocabulary; 0: the student's (uld_loss)",
    )
    bench.add_argument(
        "--num-samples",
        type=_int_at_least(1),
        default=50,
        help="draws per token (sample_teacher, sparse_kd_loss)",
    )
    bench.add_argument(
        "--temperature",
        type=_number(0.0),
        default=1.0,
        help="proposal temperature (sample_teacher)",
    )
    bench.add_argument(
        "--method",
        default="random",
        choices=["random", "priority"],
        help="sampling method (sample_teacher)",
    )
    bench.add_argument(
        "--k",
        type=_int_at_least(1),
        default=64,
        help="ids kept per token by --method priority (sample_teacher), and "
        "by the teacher's top-k (onpolicy, fused_linear_topk)",
    )
    bench.add_argument("--batch", type=_int_at_least(1), default=4096, help="problems (sinkhorn)")
    bench.add_argument("--n", type=_int_at_least(1), default=64, help="rows per problem (sinkhorn)")
    bench.add_argument(
        "--m", type=_int_at_least(1), default=64, help="columns per problem (sinkhorn)"
    )
    bench.add_argument("--eps", type=_number(0.0), default=0.05, help="regularization (sinkhorn)")
    bench.add_argument(
        "--tol",
        type=_number(0.0, low_open=False),
        default=1e-6,
        help="L1 marginal error to stop at (sinkhorn)",
    )
    bench.add_argument(
        "--max-iters", type=_int_at_least(1), default=1000, help="iteration cap (sinkhorn)"
    )
    bench.add_argument(
        "--eps-scaling",
        type=_number(0.0, 1.0),
        default=None,
        help="fastkd's eps-scaling factor kappa (sinkhorn)",
    )
    bench.add_argument(
        "--pot-limit",
        type=_int_at_least(0),
        default=256,
        help="problems POT's per-problem loop solves, its time scaled to the "
        "batch; 0: all (sinkhorn)",
    )
    bench.add_argument(
        "--peers",
        nargs="+",
        default=["torch", "pot", "pot-batch", "geomloss"],
        choices=["torch", "pot", "pot-batch", "geomloss"],
        help="peers to time beside fastkd (sinkhorn)",
    )
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--divergence", nargs="+", default=["fkl"], choices=sorted(DIVERGENCES))
    bench.add_argument(
        "--beta", type=_number(0.0, 1.0, low_open=False, high_open=False), default=0.5
    )
    bench.add_argument("--warmup", type=_int_at_least(0), default=2)
    bench.add_argument("--reps", type=_int_at_least(1), default=5)
    bench.add_argument(
        "--threads", type=_int_at_least(0), default=0, help="torch threads (0: torch's default)"
    )
    bench.add_argument("--out", help="write the results as JSON here")
    bench.add_argument("--markdown", help="write the tables as markdown here")

    for name, help_text in (
        ("distill", "train a student from a config (TOML or YAML)"),
        ("cache", "write the teacher cache of a config's training data"),
        ("eval", "evaluate a trained student on a config's held-out data"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("config", help="the config file (TOML, or YAML by extension)")
        command.add_argument(
            "--set",
            action="append",
            metavar="SECTION.KEY=VALUE",
            help="override a config value (repeatable), e.g. --set train.lr=1e-3",
        )
        if name == "eval":
            command.add_argument(
                "--model",
                help="the model folder to evaluate (default: the "
                "run's output.dir/model, else model.student)",
            )

    demo = sub.add_parser(
        "demo",
        help="a distillation study end to end: corpus, tokenizer, "
        "teacher, five students, one table",
    )
    demo.add_argument(
        "--size",
        choices=["small", "medium", "large"],
        default="small",
        help="small fits two CPU cores in minutes; medium and large are for a GPU",
    )
    demo.add_argument("--out", default="fastkd-demo", help="output folder (reused by reruns)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress lines")

    args = parser.parse_args(argv)
    commands = {
        "info": _cmd_info,
        "bench": _cmd_bench,
        "demo": _cmd_demo,
        "distill": _cmd_distill,
        "cache": _cmd_cache,
        "eval": _cmd_eval,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
