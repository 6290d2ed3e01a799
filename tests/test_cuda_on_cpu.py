"""fastkd's CUDA kernels executed on the CPU (tools/cuda_on_cpu): the harness itself (warp
collectives, barriers, clusters, shared memory, cp.async, fp16/bf16 conversions, and misuse
reported instead of hanging), then the kd_loss, sample_teacher and Sinkhorn kernels and the row
kernels of fused_linear_logprobs and fused_linear_topk against the CPU kernels and the float64
reference, through fastkd's public functions.

The CUDA kernels run in place of the CPU kernels: ``fastkd.ops._launch.native`` is pointed at a
stand-in for ``fastkd._C`` whose ``*_cpu`` entries call the CUDA launchers, so every field reaches
them as fastkd's Python side fills it. Building the library takes about 25 s on 2 cores (cached
under build/cuda_on_cpu afterwards), hence the slow mark.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fastkd
import fastkd.ops._launch as launch_module
from fastkd.ops._native import native
from fastkd.reference import kd_loss_reference

from helpers import assert_within_torch_error, make_labels, make_logits

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "cuda_on_cpu"
sys.path.insert(0, str(TOOLS))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the kernels"),
    pytest.mark.skipif(native() is None, reason="fastkd._C (the CPU kernels compared against)"),
]

PLANS = ["warp", "stream", "staged", "staged:2", "staged:4", "staged:8"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Agreement of CUDA and CPU gradients relative to the largest element: a rounding step of the
# stored dtype (the two kernels' exp differ by an ulp or two, which can move a rounding), and
# for fp32 the few ulps by which fp32 sums of such terms differ.
GRAD_ULP = {torch.float32: 2.0**-17, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def harness():
    from build_kernels import BuildError
    from kernel_harness import load

    try:
        return load()
    except BuildError as exc:  # the message holds the failed command and its output
        pytest.fail(str(exc))


@pytest.fixture
def on_cuda_kernels(harness, monkeypatch):
    """Runs fastkd's ``backend="cpu"`` kernels (kd_loss, sample_teacher, sinkhorn and the lm_head
    ops' row kernels) as the CUDA kernels; fails the test if none was launched."""
    monkeypatch.setattr(launch_module, "native", lambda: harness.native_module(native()))
    before = harness.launch_count()
    yield harness
    assert harness.launch_count() > before, "no CUDA kernel ran"


def real_cpu(fn):
    """``fn()`` with the real CPU kernels (undoing on_cuda_kernels for the call)."""
    patched = launch_module.native
    launch_module.native = native
    try:
        return fn()
    finally:
        launch_module.native = patched


# ---- stage 1: the harness --------------------------------------------------------------------


def test_warp_shuffles_sum_and_scan(harness):
    x = torch.randn(96, generator=torch.Generator().manual_seed(0))
    out = harness.selftest("warp_sums", x, 3 * 96, blocks=3, threads=32).view(3, 32, 3)
    warps = x.view(3, 32).double()
    assert torch.allclose(
        out[:, :, 0].double(), warps.sum(1, keepdim=True).expand(3, 32), atol=1e-5
    )
    assert torch.allclose(out[:, 0, 1].double(), warps.sum(1), atol=1e-5)
    assert torch.allclose(out[:, :, 2].double(), warps.cumsum(1), atol=1e-5)


def test_ballot_and_indexed_shuffle(harness):
    x = torch.tensor([float(v) for v in range(-5, 27)] * 2)
    out = harness.selftest("ballots", x, 2 * 64, blocks=1, threads=64).view(64, 2)
    for w in range(2):
        lanes = x[32 * w : 32 * w + 32]
        ballot = sum(1 << i for i in range(32) if lanes[i] > 0)
        assert (out[32 * w : 32 * w + 32, 0] == float(ballot)).all()
        picked = lanes[lanes.long() & 31]
        assert torch.equal(out[32 * w : 32 * w + 32, 1], picked)


def test_syncthreads_reduction_and_dynamic_shared_memory(harness):
    x = torch.arange(256, dtype=torch.float32)
    out = harness.selftest("block_sums", x, 4, blocks=2, threads=128)
    assert out.tolist() == [x[:128].sum().item(), x[128:].sum().item(), 1.0, 1.0]
    out = harness.selftest("reverse_blocks", x[:96], 96, blocks=3, threads=32, smem=128)
    assert torch.equal(out, x[:96].view(3, 32).flip(1).reshape(-1))


def test_cluster_exchanges_shared_memory(harness):
    x = torch.arange(16, dtype=torch.float32)
    out = harness.selftest("cluster_swap", x, 16, blocks=4, threads=32)
    assert torch.equal(out, x.view(2, 2, 4).flip(1).reshape(-1))


def test_cp_async_lands_when_its_group_is_waited_for(harness):
    x = torch.arange(128, dtype=torch.float32)
    out = harness.selftest("copy_async", x, 64, blocks=1, threads=32).view(32, 2)
    assert torch.isnan(out[:, 0]).all()  # the poison of fresh shared memory
    assert torch.equal(out[:, 1], x[::4])


def test_schedule_order_exposes_a_missing_barrier(harness):
    x = torch.arange(64, dtype=torch.float32)
    results = []
    for order in (0, 1):
        with harness.settings(order=order):
            results.append(harness.selftest("racy_neighbours", x, 64, blocks=1, threads=64))
    assert not torch.equal(results[0], results[1])


def test_fp16_and_bf16_conversions_round_like_torch(harness):
    g = torch.Generator().manual_seed(0)
    specials = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25,
                1.5 * 2.0**-25, 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 1e-45, math.inf,
                -math.inf, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8,
                3.0e38]  # fmt: skip
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = torch.cat([
        torch.tensor(specials),
        torch.randn(4000, generator=g) * 10.0 ** torch.randint(-8, 6, (4000,), generator=g),
        halves.float()[~torch.isnan(halves.float())],
    ])  # fmt: skip
    x = x[: (x.numel() // 32) * 32]
    out = harness.selftest("conversions", x, 3 * x.numel(), blocks=x.numel() // 32, threads=32)
    out = out.view(-1, 3)
    half_bits = x.half().view(torch.int16).int() & 0xFFFF
    bf16_bits = x.bfloat16().view(torch.int16).int() & 0xFFFF
    assert torch.equal(out[:, 0].int(), half_bits)
    assert torch.equal(out[:, 1].int(), bf16_bits)
    assert torch.equal(out[:, 2], x.half().float())
    nan = harness.selftest("conversions", torch.full((32,), math.nan), 96, blocks=1, threads=32)
    assert nan.view(32, 3)[:, 0].eq(0x7FFF).all() and nan.view(32, 3)[:, 1].eq(0x7FFF).all()


@pytest.mark.parametrize(
    "name,blocks,threads,smem,match",
    [
        ("deadlock", 1, 32, 0, r"deadlock.*threads 0-15 wait at __syncthreads.*"
         r"threads 16-31 wait at __shfl_sync"),
        ("divergent_barrier", 1, 32, 0, r"threads wait at different barriers"),
        ("exited_lanes", 1, 32, 0, r"names lane 16, which has exited"),
        ("read_outside_mask", 1, 32, 0, r"reads lane 20, which is not in its mask 0x0000ffff"),
        ("shared_overflow", 1, 32, 256, r"0 bytes past the end of the 256 bytes of dynamic"),
        ("misaligned_vector", 1, 32, 0, r"__ldg of 16 bytes at the misaligned address"),
        ("wait_without_arrive", 2, 32, 0, r"__cluster_barrier_wait .* without a "
         r"__cluster_barrier_arrive"),
    ],
)  # fmt: skip
def test_misuse_fails_the_launch_with_a_description(harness, name, blocks, threads, smem, match):
    from kernel_harness import CudaKernelError

    x = torch.full((64,), 64.0)
    with pytest.raises(CudaKernelError, match=match):
        harness.selftest(name, x, 64, blocks=blocks, threads=threads, smem=smem)
    # The failure is reported once; the next launch starts clean.
    harness.selftest("warp_sums", torch.zeros(32), 96, blocks=1, threads=32)


# ---- stage 2: kd_loss ------------------------------------------------------------------------


def kd_run(student, teacher, labels=None, **kw):
    s = student.detach().clone().requires_grad_()
    kw.setdefault("reduction", "none")
    loss = fastkd.kd_loss(s, teacher, labels=labels, backend="cpu", **kw)
    loss.sum().backward()
    return loss.detach(), s.grad


def check_kd(student, teacher, labels=None, *, reference=None, **kw):
    """The CUDA kernel (under the patched native module) against the CPU kernel: loss to fp32
    rounding, gradient to a rounding step of its dtype; fp32 inputs also against the float64
    reference within the float32 torch error."""
    loss, grad = kd_run(student, teacher, labels, **kw)
    cpu_loss, cpu_grad = real_cpu(lambda: kd_run(student, teacher, labels, **kw))
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss, cpu_loss, rtol=2e-5, atol=2e-6, equal_nan=True)
    scale = max(cpu_grad.float().abs().nan_to_num(0.0, 0.0, 0.0).max().item(), 1e-30)
    ulp = GRAD_ULP[student.dtype]
    keep = torch.ones_like(grad, dtype=torch.bool)
    if kw.get("divergence") == "tvd":
        # tvd's gradient steps with sign(q - p), also through the row's dot: in a row where q and
        # p of some element agree to rounding, either side is right (the float64 reference
        # check below bounds those rows).
        v = min(student.shape[-1], teacher.shape[-1])
        gap = _log_probs(student[..., :v], **kw) - _log_probs(teacher[..., :v], **kw)
        keep &= (gap.abs() > 1e-4).all(-1, keepdim=True)
        # Its q (sign - dot) / 2 cancels where dot -> 1, magnifying the exp error that both GPU
        # and harness have at large |a| (the rounding of a log2(e), |a| 2^-24): 4x torch's own
        # error at T = 0.5, which the float64 reference check below admits.
        ulp = max(ulp, 2.0**-9)
    torch.testing.assert_close(
        grad.float()[keep], cpu_grad.float()[keep], rtol=ulp, atol=2 * ulp * scale, equal_nan=True
    )
    if reference and student.dtype == torch.float32:
        exact = _kd_reference(student, teacher, labels, torch.float64, **kw)
        fp32 = _kd_reference(student, teacher, labels, torch.float32, **kw)
        assert_within_torch_error("loss", loss, exact[0], fp32[0])
        assert_within_torch_error("grad", grad, exact[1], fp32[1])


def _log_probs(logits, *, temperature=1.0, softcap=None, **_):
    z = logits.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z / temperature, -1)


def _kd_reference(student, teacher, labels, dtype, **kw):
    s = student.detach().to(dtype).requires_grad_()
    extra = {} if dtype == torch.float64 else {"compute_dtype": torch.float32}
    kw.setdefault("reduction", "none")
    loss = kd_loss_reference(s, teacher.to(dtype), labels=labels, **extra, **kw)
    if not loss.requires_grad:
        return loss.detach(), torch.zeros_like(s)
    loss.sum().backward()
    return loss.detach(), s.grad


# The low-precision loads are the same code at every vocabulary; they run at the two that span
# several chunks per thread (1000, 4099), fp32 at all four (168 of 504 cases left out).
VOCAB_DTYPES = [
    pytest.param(vocab, dtype, id=f"{vocab}-{dtype}")
    for vocab in (1, 31, 1000, 4099)
    for dtype in DTYPES
    if dtype == torch.float32 or vocab >= 1000
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("vocab,dtype", VOCAB_DTYPES)
@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_kd_loss_every_divergence_plan_dtype_vocab(
    on_cuda_kernels, monkeypatch, divergence, vocab, dtype, plan
):
    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", plan)
    student = make_logits(3, vocab, dtype=dtype, seed=1)
    teacher = make_logits(3, vocab, dtype=dtype, seed=2)
    check_kd(student, teacher, divergence=divergence, reference=vocab > 1)
    launched = on_cuda_kernels.last_launch()
    ctas = int(plan.split(":")[1]) if ":" in plan else 1
    assert launched["cluster"] == (ctas, 1, 1)
    assert (launched["dynamic_smem"] > 0) == plan.startswith("staged")


OPTIONS = [
    {"temperature": 2.0},
    {"temperature": 0.5, "t2_scale": True},
    {"softcap": 4.0},
    {"hard_weight": 0.3},
    {"temperature": 1.7, "softcap": 3.0, "hard_weight": 0.5, "t2_scale": True},
    {"hard_weight": 1.0, "reduction": "mean"},
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items())
)
@pytest.mark.parametrize("divergence,dkw", [("fkl", {}), ("srkl", {"alpha": 0.9}),
                                            ("jsd", {"beta": 0.0}), ("tvd", {}),
                                            ("hellinger", {})])  # fmt: skip
def test_kd_loss_options_with_labels_and_ignored_rows(
    on_cuda_kernels, monkeypatch, divergence, dkw, options, plan
):
    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", plan)
    student = make_logits((2, 4), 300, seed=3)
    teacher = make_logits((2, 4), 300, seed=4)
    labels = make_labels((2, 4), 300, ignore_every=3)
    check_kd(student, teacher, labels, divergence=divergence, reference=True, **dkw, **options)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("divergence", list(fastkd.DIVERGENCES))
def test_kd_loss_neg_inf_logits_and_rows_without_distribution(
    on_cuda_kernels, monkeypatch, divergence, plan
):
    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", plan)
    student = make_logits(5, 131, seed=5)
    teacher = make_logits(5, 131, seed=6)
    student[0, ::3] = -math.inf  # masked columns on both sides
    teacher[0, ::3] = -math.inf
    teacher[1, 5:] = -math.inf  # a teacher with little support
    student[2] = -math.inf  # no student distribution: NaN row
    teacher[3, 7] = math.nan  # NaN row
    check_kd(student, teacher, divergence=divergence)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kd_loss_misaligned_strided_rows_and_vocab_mismatch(
    on_cuda_kernels, monkeypatch, dtype, plan
):
    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", plan)
    # Rows of a [B, T, V] slice (outer/inner strides), one element off 16-byte alignment, and a
    # student vocabulary larger than the teacher's (gradient columns past it are zero).
    student = make_logits((2, 5), 262, dtype=dtype, seed=7)[:, :-1, 1:]
    teacher = make_logits((2, 4), 250, dtype=dtype, seed=8)[:, :, 3:]
    check_kd(student, teacher, divergence="jsd", temperature=1.5)


@pytest.mark.parametrize("plan", PLANS)
def test_kd_loss_writes_only_its_outputs_and_ignores_scheduling(harness, monkeypatch, plan):
    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", plan)
    rows, vs, vt = 3, 523, 517
    student = make_logits(rows, vs, seed=9)
    teacher = make_logits(rows, vt, seed=10)
    labels = torch.tensor([4, -100, 516])
    guard = 64
    results = []
    for order in (0, 1, 2):
        grad_store = torch.full((rows * vs + 2 * guard,), 1234.5)
        loss_store = torch.full((rows + 2 * guard,), 1234.5)
        args = harness.kd_loss_args(
            student=student.data_ptr(), student_dtype=0, s_outer=vs, s_inner=0,
            teacher=teacher.data_ptr(), teacher_dtype=0, t_outer=vt, t_inner=0, inner_rows=1,
            n_rows=rows, vocab=vt, grad_vocab=vs, labels=labels.data_ptr(),
            grad=grad_store[guard:].data_ptr(), loss=loss_store[guard:].data_ptr(), divergence=1,
            temperature=1.3, softcap=0.0, soft_weight=0.7, hard_weight=0.3, grad_scale=1.0,
            ignore_index=-100, log_wp=0.0, log_wq=0.0, w_p=0.0, w_q=0.0,
        )  # fmt: skip
        with harness.settings(order=order, seed=order + 7):
            harness.kd_loss_forward(args)
        for store, n in ((grad_store, rows * vs), (loss_store, rows)):
            assert (store[:guard] == 1234.5).all() and (store[guard + n :] == 1234.5).all()
        results.append((grad_store.clone(), loss_store.clone()))
    for grad_store, loss_store in results[1:]:
        assert torch.equal(grad_store, results[0][0]) and torch.equal(loss_store, results[0][1])
    assert results[0][1][guard + 1] == 0.0  # the ignored row
    assert (results[0][0][guard + vs : guard + 2 * vs] == 0.0).all()


def test_kd_loss_plan_that_does_not_fit_is_an_error(harness, on_cuda_kernels, monkeypatch):
    from kernel_harness import CudaKernelError

    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", "staged:1")
    student, teacher = make_logits(2, 20000, seed=1), make_logits(2, 20000, seed=2)
    with harness.settings(smem_optin=64 * 1024):
        with pytest.raises(CudaKernelError, match="staged plan that does not fit"):
            kd_run(student, teacher)
    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", "staged:2")
    with harness.settings(compute_major=8):
        with pytest.raises(CudaKernelError, match="staged plan that does not fit"):
            kd_run(student, teacher)
    monkeypatch.setenv("FASTKD_CUDA_KD_PLAN", "auto")
    with harness.settings(smem_optin=64 * 1024, cluster_launch=0):
        check_kd(student, teacher, divergence="fkl")  # too long to stage: streamed
        assert on_cuda_kernels.last_launch()["dynamic_smem"] == 0


# ---- stage 3: sample_teacher and sinkhorn -----------------------------------------------------


def sample(logits, **kw):
    return fastkd.sample_teacher(logits, backend="cpu", return_logprobs=True, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "vocab,num_samples,temperature",
    [(1, 5, 1.0), (7, 20, 1.0), (1000, 64, 2.0), (4099, 300, 1.0), (600, 5000, 0.7)],
)
def test_sample_teacher_matches_cpu_kernel(on_cuda_kernels, dtype, vocab, num_samples, temperature):
    logits = make_logits((2, 2), vocab, dtype=dtype, seed=vocab)
    logits[0, 1, : vocab // 2] = -math.inf
    kw = dict(num_samples=num_samples, temperature=temperature, seed=11, token_offset=5)
    got = sample(logits, **kw)
    want = real_cpu(lambda: sample(logits, **kw))
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights, rtol=4e-6, atol=1e-7)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=4e-6, atol=4e-6)


def test_sample_teacher_strided_rows_and_invalid_rows(on_cuda_kernels):
    logits = make_logits((3, 4), 301, seed=3)[:, 1:, 2:]
    kw = dict(num_samples=40, temperature=1.3, seed=2)
    got, want = sample(logits, **kw), real_cpu(lambda: sample(logits, **kw))
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights, rtol=4e-6, atol=1e-7)
    bad = make_logits(3, 50, seed=4)
    bad[1, 3] = math.inf
    with pytest.raises(ValueError) as cuda_error:
        sample(bad, **kw)
    with pytest.raises(ValueError) as cpu_error:
        real_cpu(lambda: sample(bad, **kw))
    assert str(cuda_error.value) == str(cpu_error.value)


def sinkhorn(cost, **kw):
    return fastkd.sinkhorn(cost, backend="cpu", return_plan=True, **kw)


# Shared memory per CTA that makes the solver stage the cost, stream it with the potentials in
# shared memory, or keep the potentials in global memory, at n, m <= 70.
PLACEMENTS = {"staged": 232448, "streamed": 8192 + 3000, "global": 8192 + 16}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize(
    "options",
    [{}, {"eps_scaling": 0.5}, {"n_sizes": [12, 1, 0], "m_sizes": [40, 3, 7]}],
    ids=["plain", "scaling", "sizes"],
)
def test_sinkhorn_matches_cpu_kernel(on_cuda_kernels, placement, dtype, transposed, options):
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(3, 40, 70, generator=g) if transposed else torch.rand(3, 70, 40, generator=g)
    cost = (cost.transpose(1, 2) if transposed else cost).to(dtype)
    kw = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in options.items()}
    kw.update(eps=0.1, max_iters=30, tol=0.0, check_every=7)
    with on_cuda_kernels.settings(smem_optin=PLACEMENTS[placement]):
        got = sinkhorn(cost, **kw)
    want = real_cpu(lambda: sinkhorn(cost, **kw))
    assert torch.equal(got.iters, want.iters)
    for name in ("f", "g", "plan", "transport_cost", "marginal_error"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5, msg=name
        )


def test_sinkhorn_converges_like_cpu_kernel_with_warm_start(on_cuda_kernels):
    g = torch.Generator().manual_seed(1)
    cost = torch.rand(2, 33, 45, generator=g)
    a = torch.softmax(torch.randn(2, 33, generator=g), -1)
    b = torch.softmax(torch.randn(2, 45, generator=g), -1)
    cold = sinkhorn(cost, a=a, b=b, eps=0.05, tol=1e-5, check_every=1)
    warm = sinkhorn(cost, a=a, b=b, eps=0.05, tol=1e-5, check_every=1, init_g=cold.g)
    want = real_cpu(lambda: sinkhorn(cost, a=a, b=b, eps=0.05, tol=1e-5, check_every=1))
    assert cold.converged.all() and warm.converged.all()
    assert (warm.iters <= 2).all()
    torch.testing.assert_close(cold.plan, want.plan, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(cold.transport_cost, want.transport_cost, rtol=1e-4, atol=1e-6)


# ---- stage 4: the row kernels of the chunked lm_head ops ----------------------------------------
# The CUDA row kernels read the chunk logits the engine forms; they are checked through the public
# functions (several chunks per call) against the float64 reference with the checks of the ops'
# own test files, and against the CPU kernels on the rows that have no softmax.


@pytest.mark.parametrize(
    "vocab,dtype",
    [(1, torch.float32), (7, torch.float32), (300, torch.float32), (4099, torch.float32)]
    + [(1000, torch.float32), (1000, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"neg_inf": True, "temperature": 0.5},
        {"temperature": 3.0, "logit_scale": 0.5, "with_entropy": False},
    ],
    ids=["plain", "neg-inf-cold", "hot-scaled-no-entropy"],
)
def test_fused_linear_logprobs_matches_reference(on_cuda_kernels, vocab, dtype, options):
    from test_fused_linear_logprobs import assert_matches, make_problem

    options = dict(options)
    neg_inf = options.pop("neg_inf", False)
    head, targets, grads = make_problem(vocab=vocab, seed=vocab, neg_inf=neg_inf and vocab > 5)
    assert_matches(head, targets, grads, "cpu", dtype=dtype, chunk_size=8, **options)


def _identity_head_logprobs(logits, targets, **kw):
    vocab = logits.shape[-1]
    return fastkd.fused_linear_logprobs(
        logits, torch.eye(vocab), targets, backend="cpu", with_entropy=True, chunk_size=3, **kw
    )


@pytest.mark.parametrize("vocab", [5, 700])
def test_fused_linear_logprobs_rows_without_softmax(on_cuda_kernels, vocab):
    """A NaN logit makes a row's outputs NaN; a row of -inf logits has lse = -inf (the bias puts
    -inf in every row); as the CPU kernel."""
    logits = make_logits(4, vocab, seed=vocab)
    logits[1, vocab // 2] = math.nan  # the identity head spreads it over the row
    targets = torch.tensor([0, 1, -100, vocab - 1])
    got = _identity_head_logprobs(logits, targets)
    want = real_cpu(lambda: _identity_head_logprobs(logits, targets))
    for name, a, b in zip(("logprob", "lse", "entropy"), got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)
    assert got.lse[1].isnan() and got.lse[2] == 0 and got.lse[[0, 3]].isfinite().all()
    bias = torch.full((vocab,), -math.inf)
    dead = fastkd.fused_linear_logprobs(
        logits[[0, 3]],
        torch.eye(vocab),
        targets[[0, 3]],
        bias=bias,
        backend="cpu",
        with_entropy=True,
    )
    assert torch.isneginf(dead.lse).all() and dead.logprob.isnan().all()
    assert dead.entropy.isnan().all()


@pytest.mark.parametrize(
    "vocab,k",
    [(1, 1), (7, 3), (57, 1), (57, 5), (57, 56), (57, 57), (300, 40), (1000, 7), (4099, 64)],
)
@pytest.mark.parametrize(
    "options", [{}, {"temperature": 0.25, "logit_scale": 2.0}], ids=["plain", "cold-scaled"]
)
def test_fused_linear_topk_matches_reference(on_cuda_kernels, vocab, k, options):
    from test_fused_linear_topk import assert_matches, make_head

    assert_matches(*make_head(vocab=vocab, seed=vocab), "cpu", k=k, chunk_size=8, **options)


def _identity_head_topk(logits, k, **kw):
    return fastkd.fused_linear_topk(
        logits,
        torch.eye(logits.shape[-1]),
        k=k,
        return_stats=True,
        backend="cpu",
        chunk_size=5,
        **kw,
    )


@pytest.mark.parametrize("vocab,k", [(9, 4), (300, 1), (300, 77), (1000, 500), (1000, 1000)])
def test_fused_linear_topk_ties_and_rows_without_softmax(on_cuda_kernels, vocab, k):
    """Integer logits tie in every row, so the kernel must rank the ties at the k-th value by id
    (its tiled pass); ids equal the CPU kernel's, and so do the sums, including a row with a
    NaN (all NaN) and a row of -inf (padding ids, as the CPU kernel)."""
    g = torch.Generator().manual_seed(vocab + k)
    logits = torch.randint(-3, 4, (12, vocab), generator=g).float()
    logits[2, 1] = math.nan
    got_targets, got_tail, got_lse = _identity_head_topk(logits, k)
    want_targets, want_tail, want_lse = real_cpu(lambda: _identity_head_topk(logits, k))
    assert torch.equal(got_targets.ids, want_targets.ids)
    for name in ("logprobs", "weights", "tail_mass"):
        torch.testing.assert_close(
            getattr(got_targets, name),
            getattr(want_targets, name),
            rtol=2e-6,
            atol=2e-6,
            equal_nan=True,
            msg=name,
        )
    torch.testing.assert_close(got_tail, want_tail, rtol=2e-6, atol=2e-6, equal_nan=True)
    torch.testing.assert_close(got_lse, want_lse, rtol=2e-6, atol=2e-6, equal_nan=True)
    assert got_lse[2].isnan() and got_lse[[0, 1]].isfinite().all()
    bias = torch.full((vocab,), -math.inf)
    dead = fastkd.fused_linear_topk(
        logits[:2], torch.eye(vocab), bias=bias, k=k, return_stats=True, backend="cpu"
    )
    want_dead = real_cpu(
        lambda: fastkd.fused_linear_topk(
            logits[:2], torch.eye(vocab), bias=bias, k=k, return_stats=True, backend="cpu"
        )
    )
    assert torch.equal(dead[0].ids, want_dead[0].ids) and (dead[0].ids == -1).all()
    assert dead[1].isnan().all() and want_dead[1].isnan().all()


@pytest.mark.parametrize("log_tail", [-1.0, -16.0, -60.0])
def test_fused_linear_topk_tail_exact_near_kept_mass_one(on_cuda_kernels, log_tail):
    from test_fused_linear_topk import test_tail_exact_where_kept_mass_is_near_one

    test_tail_exact_where_kept_mass_is_near_one("cpu", "cpu", log_tail)


def test_row_kernels_write_only_their_outputs_and_ignore_scheduling(harness):
    """Both row kernels at the argument level: nothing written outside the outputs, identical
    bits under every run order (the top-k slots as a set: the op orders them), and the 32-bit
    column limit refused before any launch."""
    from kernel_harness import CudaKernelError

    rows, vocab, k, guard = 3, 523, 37, 64
    logits = make_logits(rows, vocab, seed=12)
    logits[1, ::3] = torch.randint(
        -2, 2, (175,), generator=torch.Generator().manual_seed(0)
    ).float()
    targets = torch.tensor([5, -100, 522])
    row_grads = torch.randn(rows, 3, generator=torch.Generator().manual_seed(1))

    def stores(*sizes):
        return [torch.full((n + 2 * guard,), 1234.5) for n in sizes]

    def inner(store):
        return store[guard:].data_ptr()

    results = []
    for order in (0, 1, 2):
        z = logits.clone()
        logprob, lse, entropy = stores(rows, rows, rows)
        lp_args = harness.logprob_rows_args(
            logits=z.data_ptr(), row_stride=vocab, n_rows=rows, vocab=vocab,
            targets=targets.data_ptr(), row_grads=row_grads.data_ptr(), logprob=inner(logprob),
            lse=inner(lse), entropy=inner(entropy), temperature=0.7, ignore_index=-100,
            grad_scale=1.5,
        )  # fmt: skip
        ids = torch.full((rows * k + 2 * guard,), -7, dtype=torch.int64)
        values, log_tail, top_lse = stores(rows * k, rows, rows)
        topk_args = harness.topk_rows_args(
            logits=logits.data_ptr(), row_stride=vocab, n_rows=rows, vocab=vocab, k=k,
            ids=inner(ids), logprobs=inner(values), log_tail=inner(log_tail), lse=inner(top_lse),
            temperature=0.7,
        )  # fmt: skip
        with harness.settings(order=order, seed=order + 3):
            harness.fused_linear_topk(topk_args)
            harness.fused_linear_logprobs(lp_args)
        for store, n in ((logprob, rows), (lse, rows), (entropy, rows), (values, rows * k)):
            assert (store[:guard] == 1234.5).all() and (store[guard + n :] == 1234.5).all()
        assert (ids[:guard] == -7).all() and (ids[guard + rows * k :] == -7).all()
        slot_ids, slot_order = ids[guard : guard + rows * k].view(rows, k).sort(-1)
        slot_values = values[guard : guard + rows * k].view(rows, k).gather(-1, slot_order)
        results.append((z, logprob, lse, entropy, slot_ids, slot_values, log_tail, top_lse))
    for result in results[1:]:
        for got, want in zip(result, results[0]):
            assert torch.equal(got, want)
    z, logprob, lse = results[0][:3]
    assert logprob[guard + 1] == 0 and lse[guard + 1] == 0 and (z[1] == 0).all()  # ignored row
    with pytest.raises(CudaKernelError, match="vocabulary too large for CUDA"):
        harness.fused_linear_topk(
            harness.topk_rows_args(
                logits=0,
                row_stride=2**31,
                n_rows=0,
                vocab=2**31,
                k=1,
                ids=0,
                logprobs=0,
                log_tail=0,
                lse=0,
                temperature=1.0,
            )
        )
    with pytest.raises(CudaKernelError, match="vocabulary too large for CUDA"):
        harness.fused_linear_logprobs(
            harness.logprob_rows_args(
                logits=0,
                row_stride=2**31,
                n_rows=0,
                vocab=2**31,
                targets=0,
                row_grads=0,
                logprob=0,
                lse=0,
                entropy=0,
                temperature=1.0,
                ignore_index=-100,
                grad_scale=1.0,
            )
        )
