"""``fastkd bench OP``: its options, the cases each op sweeps, and the run that times them and
writes the tables and results."""

from __future__ import annotations

import platform

import torch

from ._cli_types import _device, _int_at_least, _number
from .divergences import DIVERGENCES

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


def _add_bench_parser(sub) -> None:
    """Adds the ``bench`` subcommand and its options to ``sub``, the ``fastkd`` parser's
    subparsers."""
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
