"""The argument types of the ``fastkd`` command's options: each parses one value and rejects a
bad one with a message saying what is allowed."""

from __future__ import annotations

import argparse
import math

import torch


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
