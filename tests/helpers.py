"""What the tests share: the backend matrix from the op registry, the divergence table, input
factories (adversarial logits and layouts), the tolerance policy, and a peak-memory probe.

Imported as ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` (``pythonpath``
in pyproject.toml). conftest.py keeps only pytest's hooks and fixtures, and decides
TRITON_INTERPRET before anything here imports triton.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd.ops._registry import backend_spec, interpreted, kernel_backends

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


# ---- the backend matrix ---------------------------------------------------------------------


def fused_backends(device: str) -> list[str]:
    """The fused backends of kd_loss that can run on ``device`` here."""
    if device == "cuda" and not HAS_CUDA:
        return []
    return kernel_backends("kd_loss", device)


def backend_marks(op: str, backend: str, device: str = "cpu") -> list:
    """The marks of a test running ``op`` on ``backend``: ``gpu`` on CUDA, ``triton`` for a
    backend that needs the package."""
    marks = [pytest.mark.gpu] if device == "cuda" else []
    if backend_spec(op, backend).needs_triton:
        marks.append(pytest.mark.triton)
    return marks


def device_params() -> list:
    """``device`` params of every device here, CUDA marked ``gpu``."""
    return [pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else [], id=d) for d in DEVICES]


def device_backend_params(op: str, *, small_ok: bool = True) -> list:
    """``(device, backend)`` params of ``op``'s kernels on every device here, id
    ``device-backend``; an interpreted backend (Triton on CPU) only where ``small_ok``."""
    out = []
    for device in DEVICES:
        for backend in kernel_backends(op, device):
            if interpreted(op, backend, device) and not small_ok:
                continue
            out.append(
                pytest.param(
                    device,
                    backend,
                    marks=backend_marks(op, backend, device),
                    id=f"{device}-{backend}",
                )
            )
    return out


def op_backend_params(op: str, *, small_ok: bool = True, reference: bool = True) -> list:
    """``(device, backend)`` params of every backend of ``op`` that runs here, the reference too
    with ``reference``, id ``device-backend``; an interpreted backend only where ``small_ok``."""
    out = []
    for device in DEVICES:
        for backend in fastkd.available_backends(op, device):
            spec = backend_spec(op, backend)
            if (spec.is_reference and not reference) or (
                interpreted(op, backend, device) and not small_ok
            ):
                continue
            out.append(
                pytest.param(
                    device,
                    backend,
                    marks=backend_marks(op, backend, device),
                    id=f"{device}-{backend}",
                )
            )
    return out


def backend_params(op: str, *, small_ok: bool = True, fused_only: bool = False) -> list:
    """``backend`` params of ``op`` on CPU (the reference included unless ``fused_only``), id
    the backend's name; an interpreted backend only where ``small_ok``."""
    out = []
    for backend in fastkd.available_backends(op, "cpu"):
        spec = backend_spec(op, backend)
        if (interpreted(op, backend, "cpu") and not small_ok) or (spec.is_reference and fused_only):
            continue
        out.append(pytest.param(backend, marks=backend_marks(op, backend), id=backend))
    return out


def compiled_backends(op: str, device: str = "cpu") -> list[str]:
    """``op``'s backends available on ``device`` that do not run in an interpreter: the ones
    fast enough for large cases."""
    return [b for b in fastkd.available_backends(op, device) if not interpreted(op, b, device)]


# ---- divergences ----------------------------------------------------------------------------


def divergence_cases(values=(0.1, 0.0, 1.0)) -> list[tuple[str, dict]]:
    """(name, kwargs) for every divergence of ``fastkd.DIVERGENCES``: those without parameters
    once, the others with their parameter at kd_loss's default and then at each of ``values``
    (by default both ends of [0, 1], which include every edge case)."""
    defaults = inspect.signature(fastkd.kd_loss).parameters
    cases = []
    for name, div in fastkd.DIVERGENCES.items():
        if not div.parameters:
            cases.append((name, {}))
        for param in div.parameters:
            for value in dict.fromkeys((defaults[param].default, *values)):
                cases.append((name, {param: value}))
    return cases


def divergence_case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return "-".join([name, *(f"{k}{v}" for k, v in kwargs.items())])


# ---- input factories ------------------------------------------------------------------------


def make_logits(
    lead,
    vocab: int,
    *,
    scale: float = 3.0,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    draw_dtype=torch.float32,
) -> torch.Tensor:
    """``scale`` N(0, 1) logits ``[*lead, vocab]`` (``lead`` an int or a shape), drawn in
    ``draw_dtype`` from a generator seeded with ``seed`` and then cast to ``dtype``."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, vocab, generator=g, dtype=draw_dtype) * scale
    return logits.to(dtype).to(device)


def make_labels(
    lead, vocab: int, *, ignore_every: int = 4, device="cpu", seed: int = 1
) -> torch.Tensor:
    """Labels ``[*lead]`` in [0, vocab), every ``ignore_every``-th one (in row order, from the
    first) -100."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, lead, generator=g)
    labels.view(-1)[::ignore_every] = -100
    return labels.to(device)


def long_tailed_logits(rows: int, vocab: int, *, seed: int = 0, sharpness=(3.0, 10.0)):
    """LM-like teacher logits: a Zipf-like prior -1.1 log(rank) over a per-row random ranking,
    plus noise of per-row scale s ~ U(sharpness)."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    ranks = torch.argsort(torch.rand(rows, vocab, generator=g), -1)
    scale = torch.empty(rows, 1).uniform_(*sharpness, generator=g)
    return prior[ranks] + scale * torch.randn(rows, vocab, generator=g)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` (at least 2-D) in a non-contiguous layout: its first two dimensions
    stored transposed."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


# ---- the tolerance policy -------------------------------------------------------------------

# float32 inputs are held to torch's own float32 error (the reference evaluated in float32),
# measured against the float64 reference on the same inputs: the fused result may be at most
# ERR_FACTOR times worse, plus a floor of FLOOR_EPS float32 epsilons of the result's magnitude,
# at least 1 (the scale of probabilities: e.g. srkl with alpha = 1 is exactly 0 but is computed
# from terms q (1 - sum q) whose rounding is eps q; torch is sometimes exact by luck).
ERR_FACTOR = 8.0
FLOOR_EPS = 16.0


# Two float64 computations of the same value by different routes (e.g. a streamed and a formed
# cost): agreement to rounding of the float64 arithmetic.
FLOAT64_TOL = dict(atol=1e-10, rtol=1e-8)


def assert_within_torch_error(name, value, exact, torch_value):
    value, exact, torch_value = value.double().cpu(), exact.cpu(), torch_value.double().cpu()
    assert torch.equal(torch.isnan(value), torch.isnan(exact)), f"{name}: NaN pattern differs"
    finite = torch.isfinite(exact)
    assert torch.equal(value[~finite], exact[~finite]), f"{name}: infinities differ"
    if not finite.any():
        return
    v, e, tv = value[finite], exact[finite], torch_value[finite]
    err = (v - e).abs().max().item()
    torch_err = (tv - e).abs().max().item()
    floor = FLOOR_EPS * torch.finfo(torch.float32).eps * max(e.abs().max().item(), 1.0)
    assert err <= ERR_FACTOR * torch_err + floor, (
        f"{name}: max error {err:.3g} vs torch float32 error {torch_err:.3g} (floor {floor:.3g})"
    )


def assert_relative_within_torch_error(name, value, exact, torch_value):
    """assert_within_torch_error on values divided by the largest exact one: the absolute floor
    would pass anything below it, such as a whole gradient off by a relative 1e-5."""
    scale = exact.abs().max().item()
    assert_within_torch_error(
        f"{name} / max|{name}|", value / scale, exact / scale, torch_value / scale
    )


# ---- subprocess probes ----------------------------------------------------------------------


def extra_peak_kb(script: str, arg: str, env: dict | None = None) -> int:
    """Runs ``script`` (which prints its peak RSS above a baseline, in kB, last) in a fresh
    Python with ``arg`` as sys.argv[1]; skips the test where /proc/self/clear_refs cannot reset
    the peak RSS (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", script, arg],
        check=True,
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    return int(out.stdout.strip().splitlines()[-1])


# ---- sampled targets ------------------------------------------------------------------------

# (dtype, V, N, temperature) of the sampler's tests against its reference.
SAMPLE_TEACHER_CASES = [
    (torch.float32, 1, 5, 1.0),
    (torch.float32, 7, 50, 1.0),
    (torch.float32, 1271, 50, 1.0),
    (torch.float32, 4099, 257, 1.0),
    (torch.bfloat16, 1271, 50, 1.0),
    (torch.float16, 1271, 12, 1.0),
    (torch.float32, 1271, 50, 2.0),
    (torch.float32, 1271, 50, 0.7),
]


def check_well_formed(targets, num_samples, vocab, temperature=None):
    """Ids in range, ascending and distinct, padding last with weight 0; at temperature 1 also
    weights count / N with counts summing to N (targets on any device)."""
    targets = targets.to("cpu")
    ids, weights = targets.ids, targets.weights
    kept = ids >= 0
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape[-1] == num_samples and torch.all(ids < vocab)
    # ids ascending and distinct, padding at the end with weight 0
    assert torch.all(kept[..., :-1] | ~kept[..., 1:])
    both = kept[..., :-1] & kept[..., 1:]
    assert torch.all((ids[..., 1:] > ids[..., :-1]) | ~both)
    assert torch.all(weights[~kept] == 0) and torch.all(weights[kept] > 0)
    if temperature == 1.0:
        counts = weights * num_samples
        torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            counts.sum(-1), torch.full(counts.shape[:-1], float(num_samples))
        )


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi^2_dof >= stat), the upper regularized incomplete gamma function."""
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2.0, dtype=torch.float64),
            torch.tensor(stat / 2.0, dtype=torch.float64),
        )
    )
