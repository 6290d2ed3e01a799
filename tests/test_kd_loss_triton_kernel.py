"""The Triton kd_loss kernel, called through its launcher, against the float64 reference.

Runs under TRITON_INTERPRET=1 on CPU (small fp32 shapes) and compiled on a GPU, where the bf16/fp16
cases run as well. The kernel writes per-row losses and dLoss_row/dz_s, which are compared with
``kd_loss_reference(..., reduction="none")`` and the gradient of its sum.
"""

from __future__ import annotations

import importlib
import math
import os
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import fastkd

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
IGNORE = -100
DIVERGENCES = list(fastkd.DIVERGENCES)

# (dtype, atol, rtol) for the gradient, which is stored in the student's dtype; losses are fp32
# whatever the inputs and are held to the float32 row.
TOLERANCES = {
    torch.float32: (2e-6, 1e-4),
    torch.bfloat16: (2e-3, 1.6e-2),
    torch.float16: (5e-4, 2e-3),
}


@dataclass(frozen=True)
class Case:
    name: str
    rows: int = 5
    vs: int = 300  # student vocabulary
    vt: int | None = None  # teacher vocabulary (None: same as the student's)
    temperature: float = 1.0
    t2_scale: bool = False
    softcap: float | None = None
    scale: float = 3.0  # logits ~ scale * N(0, 1)
    labels: str | None = None  # None, "some_ignored" or "all_ignored"
    hard_weight: float = 0.0
    neg_inf: float = 0.0  # fraction of columns set to -inf in both models
    layout: str = "contiguous"  # or "sliced_student" ([B, T, V][:, :-1, :]), "broadcast_teacher"
    beta: float = 0.5
    alpha: float = 0.1
    dtypes: tuple = (torch.float32, torch.float32)  # (student, teacher)
    # Widest vocabulary chunk of the kernel (None: its own choice). 256 makes V = 300 take two
    # chunks, the online-rescaling path that a single chunk never reaches.
    block: int | None = 256
    # Gradient atol in place of the table's, where fp32 itself is the limit.
    grad_atol: float | None = None
    gpu_only: bool = False


CASES = [
    Case("base"),
    Case("one_chunk", block=None, labels="some_ignored", hard_weight=0.2, temperature=2.0),
    Case("one_row_v7", rows=1, vs=7),
    Case("v1", vs=1),
    Case("temperature_t2", rows=1, temperature=2.0, t2_scale=True),
    Case("temperature_below_1", rows=1, vs=7, temperature=0.5),
    Case("softcap", temperature=1.5, softcap=30.0, scale=20.0),
    Case("mixture_weights", rows=1, beta=0.8, alpha=0.6, temperature=1.3),
    Case("labels_ignored", labels="some_ignored"),
    Case("all_ignored", rows=1, labels="all_ignored", hard_weight=0.5),
    Case("hard_ce", labels="some_ignored", hard_weight=0.3),
    Case(
        "hard_ce_tempered_softcap",
        labels="some_ignored",
        hard_weight=0.5,
        temperature=2.0,
        softcap=5.0,
        scale=4.0,
    ),
    Case("hard_ce_v1", vs=1, labels="some_ignored", hard_weight=0.4, temperature=2.0),
    Case("student_wider", vs=300, vt=290, labels="some_ignored", hard_weight=0.2),
    Case("teacher_wider", rows=1, vs=290, vt=300, temperature=2.0),
    Case("neg_inf", neg_inf=0.3, temperature=2.0, labels="some_ignored", hard_weight=0.2),
    Case("neg_inf_softcap", rows=1, neg_inf=0.3, softcap=10.0),
    Case("extreme", scale=1e4),
    # a = z * fp32(1/T) holds a 1e4-scale logit to ~1e-3 absolute, so softmax terms near the
    # maximum move by up to ~1e-3 relative in any fp32 kernel.
    Case(
        "extreme_tempered_ce",
        scale=1e4,
        temperature=3.0,
        labels="some_ignored",
        hard_weight=0.3,
        grad_atol=2e-3,
    ),
    Case("sliced_student", layout="sliced_student", labels="some_ignored", hard_weight=0.2),
    Case("broadcast_teacher", layout="broadcast_teacher", temperature=2.0),
    Case("bf16", dtypes=(torch.bfloat16, torch.bfloat16), gpu_only=True),
    Case(
        "bf16_student_fp32_teacher",
        dtypes=(torch.bfloat16, torch.float32),
        vs=4099,
        block=None,
        labels="some_ignored",
        hard_weight=0.2,
        gpu_only=True,
    ),
    Case(
        "fp16_student_bf16_teacher",
        dtypes=(torch.float16, torch.bfloat16),
        temperature=2.0,
        gpu_only=True,
    ),
    Case(
        "fp32_multi_chunk",
        vs=4099,
        vt=4097,
        block=None,
        labels="some_ignored",
        hard_weight=0.2,
        temperature=2.0,
        gpu_only=True,
    ),
]


@pytest.fixture(scope="module")
def kd():
    """The launcher, the config/layout helpers and the reference."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
    return SimpleNamespace(
        kernel=importlib.import_module("fastkd.triton.kd_loss"),
        make_kd_config=importlib.import_module("fastkd.ops._kd_config").make_kd_config,
        row_layout=importlib.import_module("fastkd.ops._layout").row_layout,
        reference=importlib.import_module("fastkd.reference.kd_loss").kd_loss_reference,
    )


def make_inputs(case: Case, seed: int):
    """Student and teacher logits (in their layouts) and labels for `case`."""
    g = torch.Generator().manual_seed(seed)
    vt = case.vt or case.vs
    v = min(case.vs, vt)
    lead = (case.rows,)
    if case.layout == "sliced_student":
        lead = (2, 3)
    n = math.prod(lead)
    zs = case.scale * torch.randn(*lead, case.vs, generator=g, dtype=torch.float64)
    zt = case.scale * torch.randn(*lead, vt, generator=g, dtype=torch.float64)
    if case.neg_inf:
        # The same columns are outside both supports; column 0 stays finite in every row.
        off = torch.rand(*lead, v, generator=g) < case.neg_inf
        off[..., 0] = False
        zs[..., :v][off] = -math.inf
        zt[..., :v][off] = -math.inf
    # Strided views are taken on the device: .to() would make them contiguous.
    zs = zs.to(DEVICE, case.dtypes[0])
    zt = zt.to(DEVICE, case.dtypes[1])
    if case.layout == "sliced_student":
        padded = torch.randn(lead[0], lead[1] + 1, case.vs, generator=g).to(DEVICE, zs.dtype)
        padded[:, :-1] = zs
        zs = padded[:, :-1, :]
    if case.layout == "broadcast_teacher":
        zt = zt[:1].expand(case.rows, vt)
    labels = None
    if case.labels is not None:
        labels = torch.randint(0, v, lead, generator=g)
        if case.neg_inf:
            labels = torch.zeros(lead, dtype=torch.int64)  # column 0 is finite
        flat = labels.view(-1)
        if case.labels == "all_ignored":
            flat.fill_(IGNORE)
        elif n > 1:
            flat[1::3] = IGNORE
    return zs, zt, None if labels is None else labels.to(DEVICE)


def run_kernel(kd, case: Case, divergence: str, zs, zt, labels):
    cfg = kd.make_kd_config(
        divergence,
        temperature=case.temperature,
        beta=case.beta,
        alpha=case.alpha,
        softcap=case.softcap,
        hard_weight=case.hard_weight,
        t2_scale=case.t2_scale,
        ignore_index=IGNORE,
    )
    student, inner_rows, s_layout = kd.row_layout(zs)
    teacher, _, t_layout = kd.row_layout(zt, inner_rows)
    n = zs.numel() // zs.shape[-1]
    grad = torch.full((n, zs.shape[-1]), math.nan, dtype=zs.dtype, device=zs.device)
    loss = torch.full((n,), math.nan, dtype=torch.float32, device=zs.device)
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    kd.kernel.kd_loss_forward(
        student,
        teacher,
        flat_labels,
        grad,
        loss,
        n_rows=n,
        inner_rows=inner_rows,
        student_layout=s_layout,
        teacher_layout=t_layout,
        vocab=min(zs.shape[-1], zt.shape[-1]),
        grad_vocab=zs.shape[-1],
        cfg=cfg,
    )
    return loss, grad


def reference(kd, case: Case, divergence: str, zs, zt, labels):
    """float64 per-row loss [N] and dLoss_row/dz_s [N, V_s]."""
    xs = zs.detach().cpu().double().requires_grad_()
    out = kd.reference(
        xs,
        zt.cpu().double(),
        divergence=divergence,
        temperature=case.temperature,
        beta=case.beta,
        alpha=case.alpha,
        labels=None if labels is None else labels.cpu(),
        ignore_index=IGNORE,
        hard_weight=case.hard_weight,
        t2_scale=case.t2_scale,
        softcap=case.softcap,
        reduction="none",
    )
    (grad,) = torch.autograd.grad(out.sum(), xs)
    return out.detach().reshape(-1), grad.reshape(-1, zs.shape[-1])


def check(loss, grad, ref_loss, ref_grad, grad_atol=None):
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(loss.cpu().double(), ref_loss, atol=atol, rtol=rtol)
    atol, rtol = TOLERANCES[grad.dtype]
    torch.testing.assert_close(grad.cpu().double(), ref_grad, atol=grad_atol or atol, rtol=rtol)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.slow  # 126 cases, 29 s of the full run's 1,025 s
def test_matches_reference(kd, case, divergence, monkeypatch):
    if case.gpu_only and INTERPRET:
        pytest.skip("bf16/fp16 and wide rows run compiled on a GPU only")
    if case.block is not None:
        monkeypatch.setattr(kd.kernel, "MAX_BLOCK_V", case.block)
    zs, zt, labels = make_inputs(case, seed=zlib.crc32(f"{case.name}/{divergence}".encode()))
    loss, grad = run_kernel(kd, case, divergence, zs, zt, labels)
    check(loss, grad, *reference(kd, case, divergence, zs, zt, labels), grad_atol=case.grad_atol)


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
@pytest.mark.parametrize("label", [-1, 290, 299])
def test_label_out_of_range(kd, divergence, label):
    """A label outside [0, vocab) that is not ignore_index gives a NaN loss and no -1 in the
    gradient (vocab = 290 here; 290 and 299 are student columns past the common vocabulary)."""
    case = Case("bad_label", rows=2, vs=300, vt=290, hard_weight=0.3, softcap=6.0)
    zs, zt, _ = make_inputs(case, seed=3)
    loss, grad = run_kernel(kd, case, divergence, zs, zt, torch.tensor([label, 5], device=DEVICE))
    assert math.isnan(loss[0].item()) and math.isfinite(loss[1].item())
    # The gradient for a valid label j, with its -hard_weight * dcap_j at j taken back.
    _, grad_valid = run_kernel(kd, case, divergence, zs, zt, torch.tensor([3, 5], device=DEVICE))
    capped = case.softcap * torch.tanh(zs[0, 3].double() / case.softcap)
    expected = grad_valid.double()
    expected[0, 3] += case.hard_weight * (1.0 - (capped / case.softcap) ** 2)
    atol, rtol = TOLERANCES[grad.dtype]
    torch.testing.assert_close(grad.double(), expected, atol=atol, rtol=rtol)
