"""The argument checks of sample_teacher: the teacher logits, the method and the arguments each
method takes (num_samples, k, tail, labels, temperature), the seed and the token offset. They
raise before any sampler runs, naming the argument, its value and what is allowed."""

from __future__ import annotations

import numbers

from ..sparse.targets import METHODS, TAILS
from ._checks import INT32_MAX, INT64_MAX, check_int, check_kernel_float, check_labels, check_logits

_MAX_SEED = 2**64


def _check_inputs(
    logits, *, num_samples, method, k, temperature, seed, token_offset, tail, labels, ignore_index
) -> None:
    check_logits("teacher_logits", logits)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    check_kernel_float("temperature", temperature)
    if (
        not isinstance(seed, numbers.Integral)
        or isinstance(seed, bool)
        or not 0 <= seed < _MAX_SEED
    ):
        raise ValueError(f"seed must be an int in [0, 2**64); got {seed!r}")
    # Draws are keyed by the global token index token_offset + i, a signed 64-bit counter in
    # every backend: the last token's index must not pass 2^63 - 1.
    tokens = logits.numel() // logits.shape[-1]
    check_int("token_offset", token_offset, 0, INT64_MAX - max(tokens - 1, 0))
    vocab = logits.shape[-1]
    if method == "random":
        check_int("num_samples", num_samples, 1, INT32_MAX)
        if k is not None or tail is not None:
            raise ValueError(f"k and tail apply to method='topk'; got k={k!r}, tail={tail!r}")
        return
    if method == "priority":
        if (
            not isinstance(k, numbers.Integral)
            or isinstance(k, bool)
            or not 1 <= k <= min(vocab, INT32_MAX)
        ):
            raise ValueError(
                f"method='priority' needs k in [1, V={vocab}] (at most {INT32_MAX}); got k={k!r}"
            )
        if num_samples is not None or tail is not None:
            raise ValueError(
                f"method='priority' keeps k ids and takes neither num_samples nor "
                f"tail; got num_samples={num_samples!r}, tail={tail!r}"
            )
        if temperature != 1.0:
            raise ValueError(
                f"method='priority' samples p = softmax(z) itself: temperature "
                f"must be 1; got {temperature!r}"
            )
        return
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"method='topk' needs k in [1, V={vocab}]; got k={k!r}")
    if tail not in TAILS:
        raise ValueError(f"method='topk' needs tail in {TAILS}; got {tail!r}")
    if temperature != 1.0:
        raise ValueError(
            f"temperature applies to method='random' (its proposal); got "
            f"{temperature!r} with method='topk'"
        )
    if tail == "label":
        if labels is None:
            raise TypeError("tail='label' needs integer labels of the logits' leading shape")
        check_int("ignore_index", ignore_index, -INT64_MAX - 1, INT64_MAX)
        check_labels(
            labels,
            logits.shape[:-1],
            logits.device,
            vocab,
            ignore_index,
            vocab_name="the teacher's vocabulary",
        )
