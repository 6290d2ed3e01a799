"""The ``fastkd`` command: ``distill``, ``cache``, ``eval``, ``demo``, ``bench`` and ``info``."""

from __future__ import annotations

import argparse
import json
import sys

from ._cli_bench import _add_bench_parser, _cmd_bench
from ._cli_types import _int_at_least

__all__ = ["main"]


def _cmd_info(args) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=2))
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

    _add_bench_parser(sub)

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
