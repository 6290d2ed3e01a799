"""Float options at the edges of float32: every option that reaches a kernel as a float32 either
survives the cast (the fused result then matches the float64 reference) or is refused with a
ValueError naming it. A softcap of 1e-50 once arrived as 0.0f, which the kernel reads as "no
cap", and returned 1.074 where the reference gives 0."""

import importlib
import math

import pytest
import torch

import fastkd

pytestmark = pytest.mark.skipif(
    "cpu" not in fastkd.available_backends("kd_loss", "cpu"),
    reason="needs the compiled CPU kernels",
)

# Below, at and above the normal float32 range [2^-126, 2^126] that the checks admit.
EDGE_VALUES = [1e-300, 1e-50, 1e-40, 2.0**-126, 1e-3, 1e3, 2.0**126, 1e39, 1e300]


def _inputs(rows=6, vocab=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3, torch.randn(rows, vocab, generator=g) * 3


def _kd(option):
    s, t = _inputs()

    def run(value, backend, dtype):
        return fastkd.kd_loss(
            s.to(dtype), t.to(dtype), divergence="jsd", backend=backend, **{option: value}
        )

    return run


def _sparse_temperature():
    s, t = _inputs(seed=1)
    targets = fastkd.sample_teacher(t, num_samples=8, backend="torch")

    def run(value, backend, dtype):
        return fastkd.sparse_kd_loss(s.to(dtype), targets, temperature=value, backend=backend)

    return run


def _uld(option):
    s, t = _inputs(seed=2)

    def run(value, backend, dtype):
        return fastkd.uld_loss(s.to(dtype), t[:, :11].to(dtype), backend=backend, **{option: value})

    return run


def _fused_linear_logit_scale():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(5, 8, generator=g), torch.randn(13, 8, generator=g)
    th, tw = torch.randn(5, 8, generator=g), torch.randn(13, 8, generator=g)

    def run(value, backend, dtype):
        return fastkd.fused_linear_kd_loss(
            h.to(dtype), w.to(dtype), th.to(dtype), tw.to(dtype), logit_scale=value, backend=backend
        )

    return run


OPTIONS = [
    ("temperature", _kd("temperature")),
    ("softcap", _kd("softcap")),
    ("num_items_in_batch", _kd("num_items_in_batch")),
    ("temperature", _sparse_temperature()),
    ("temperature", _uld("temperature")),
    ("teacher_temperature", _uld("teacher_temperature")),
    ("logit_scale", _fused_linear_logit_scale()),
]


@pytest.mark.parametrize("value", EDGE_VALUES)
@pytest.mark.parametrize("option,run", OPTIONS, ids=lambda x: x if isinstance(x, str) else "")
def test_option_survives_the_cast_or_is_refused(option, run, value):
    try:
        fused = run(value, "cpu", torch.float32)
    except ValueError as exc:
        assert option in str(exc)
        assert not 2.0**-126 <= value <= 2.0**126, f"{option}={value!r} is in range"
        return
    exact = run(value, "torch", torch.float64)
    if not torch.isfinite(exact).all():
        assert torch.equal(fused.isnan(), exact.isnan())
        return
    if not torch.isfinite(fused).all():
        # Only where plain PyTorch in float32 overflows too (e.g. z / T past 3.4e38).
        assert not torch.isfinite(run(value, "torch", torch.float32)).all()
        return
    torch.testing.assert_close(fused.double(), exact, rtol=1e-4, atol=1e-6)


def test_sample_teacher_temperature_edges():
    t, _ = _inputs()
    for value in EDGE_VALUES:
        if not 2.0**-126 <= value <= 2.0**126:
            with pytest.raises(ValueError, match="temperature"):
                fastkd.sample_teacher(t, num_samples=4, temperature=value, backend="cpu")
            continue
        if (t / value).float().isinf().any():
            # z / T itself overflows float32: said so, not reported as NaN or +inf logits.
            with pytest.raises(ValueError, match="overflows float32"):
                fastkd.sample_teacher(t, num_samples=4, temperature=value, backend="cpu")
            continue
        a = fastkd.sample_teacher(t, num_samples=4, temperature=value, backend="cpu")
        b = fastkd.sample_teacher(t, num_samples=4, temperature=value, backend="torch")
        assert torch.equal(a.ids, b.ids)


@pytest.mark.parametrize("module", ["fastkd.ops._fused_rows", "fastkd.reference.kd_loss"])
def test_num_items_in_batch_on_a_device_tensor_that_is_not_positive_gives_nan(module):
    """A device tensor's value is not read on the host (that would be a sync): a count <= 0
    reaches the division and must give NaN, never a negative or infinite loss. The CPU tensor
    here stands in for a device one by going through the reduction directly, the fused path's
    and the reference's."""
    reduce_total = importlib.import_module(module).reduce_total

    for count in (torch.tensor(-4.0), torch.tensor(0), torch.tensor([0.0])):
        assert math.isnan(reduce_total(torch.tensor(3.0), 4, None, "mean", count).item())
    assert reduce_total(torch.tensor(3.0), 4, None, "mean", torch.tensor(2)).item() == 1.5
