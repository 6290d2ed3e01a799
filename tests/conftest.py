"""Shared test setup: Triton runs under its CPU interpreter when no GPU is present (which must be
decided before anything imports triton), and GPU tests skip without one."""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastkd  # noqa: E402
from fastkd.ops._registry import (available_backends, backend_spec, interpreted,  # noqa: E402
                                  kernel_backends)

HAS_CUDA = torch.cuda.is_available()


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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def fused_backends(device: str) -> list[str]:
    """The fused backends that can run on ``device`` here."""
    if device == "cuda" and not HAS_CUDA:
        return []
    return kernel_backends("kd_loss", device)


def op_backend_params(op: str, *, small_ok: bool = True, reference: bool = True):
    """(device, backend) pytest params of every backend of ``op`` that runs here (the
    reference too, with ``reference``); interpreted ones (Triton on CPU) only where the cases
    are small (``small_ok``). CUDA cases carry the gpu mark, Triton ones the triton mark."""
    out = []
    for device in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        for backend in available_backends(op, device):
            spec = backend_spec(op, backend)
            if (spec.is_reference and not reference) or (
                    interpreted(op, backend, device) and not small_ok):
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            if spec.needs_triton:
                marks.append(pytest.mark.triton)
            out.append(pytest.param(device, backend, marks=marks, id=f"{device}-{backend}"))
    return out


# float32 inputs are held to torch's own float32 error (the reference evaluated in float32),
# measured against the float64 reference on the same inputs: the fused result may be at most
# ERR_FACTOR times worse, plus a floor of FLOOR_EPS float32 epsilons of the result's magnitude,
# at least 1 (the scale of probabilities: e.g. srkl with alpha = 1 is exactly 0 but is computed
# from terms q (1 - sum q) whose rounding is eps q; torch is sometimes exact by luck).
ERR_FACTOR = 8.0
FLOOR_EPS = 16.0


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
        f"{name}: max error {err:.3g} vs torch float32 error {torch_err:.3g} (floor {floor:.3g})")


def extra_peak_kb(script: str, arg: str, env: dict | None = None) -> int:
    """Runs ``script`` (which prints its peak RSS above a baseline, in kB, last) in a fresh
    Python with ``arg`` as sys.argv[1]; skips the test where /proc/self/clear_refs cannot reset
    the peak RSS (not Linux)."""
    import subprocess
    import sys

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", script, arg], check=True, capture_output=True,
                         text=True, env=None if env is None else {**os.environ, **env})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The trainer tests' corpus, tokenizer and tiny model configs (``train_setup.TinySetup``)."""
    pytest.importorskip("transformers")
    from train_setup import build_tiny_setup

    return build_tiny_setup(str(tmp_path_factory.mktemp("tiny-lm")))
