"""The op registry's declarations, and torch.library.opcheck over every fastkd custom op.

Each custom op (``torch.ops.fastkd.*``) gets small CPU inputs from ``SAMPLES`` and is checked on
every backend that runs it here by each of opcheck's tests: its schema, its autograd
registration, its fake kernel against the real one, and AOT dispatch with dynamic shapes.

The fused loss ops return their stored gradient (``grad_scale`` times the rows' gradients) as
outputs, and their eager backward rescales those very tensors in place by the incoming gradient,
so that no second [N, V] buffer exists (``rescale_grad_rows``; traced graphs rescale out of
place). opcheck's AOT test compares the eager outputs with the compiled ones after running the
backward of both, so there the eager gradient outputs have been rescaled and the compiled ones
have not: those cases are expected failures of that test, and
``test_rescaled_gradients_match_compiled`` compares their gradients with AOT's instead.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.testing._internal.optests.generate_tests import OpCheckError

import fastkd
from fastkd.ops._kd_config import make_kd_config
from fastkd.ops._registry import (
    BACKENDS,
    accepts,
    backend_spec,
    interpreted,
    kernel_backends,
    ops,
    resolve_backend,
)
from fastkd.reference.sinkhorn import log_weights

from helpers import make_labels, make_logits


def _fastkd_custom_ops() -> list[str]:
    return sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fastkd::")
    )


def _rand(*shape, seed, requires_grad=False):
    return make_logits(shape[:-1], shape[-1], scale=2.0, seed=seed).requires_grad_(requires_grad)


def _labels(rows, vocab, seed):
    """Labels with the first row ignored."""
    return make_labels(rows, vocab, ignore_every=rows, seed=seed)


def _kd_scalars():
    cfg = make_kd_config(
        "jsd",
        temperature=2.0,
        beta=0.3,
        alpha=0.1,
        softcap=None,
        hard_weight=0.25,
        t2_scale=False,
        ignore_index=-100,
        grad_scale=0.25,
    )
    return (
        cfg.divergence,
        cfg.temperature,
        cfg.softcap,
        cfg.soft_weight,
        cfg.hard_weight,
        cfg.ignore_index,
        cfg.log_wp,
        cfg.log_wq,
        cfg.coef,
        cfg.grad_scale,
    )


def _sparse_targets(rows, k, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)]).int()
    weights = torch.rand(rows, k, generator=g)
    return ids, weights / weights.sum(-1, keepdim=True)


def _sparse_reverse_targets(rows, k, vocab, seed):
    """Ids, log-probabilities and tail masses of support targets (p_k and p_b summing to 1)."""
    ids, weights = _sparse_targets(rows, k, vocab, seed)
    return ids, (0.75 * weights).log(), torch.full((rows,), 0.25)


# Each sample function gives (arguments, whether the eager backward rescales outputs in place)
# per case. The fused ops are called with need_grad (need_hidden, ...) True exactly when the
# student's input requires grad, and so are they here.


def _kd_loss_fused(backend):
    return [
        (
            (
                _rand(4, 11, seed=0, requires_grad=need_grad),
                _rand(4, 9, seed=1),
                _labels(4, 9, 2),
                *_kd_scalars(),
                backend,
                need_grad,
            ),
            need_grad,
        )
        for need_grad in (True, False)
    ]


def _sparse_kd_loss_fused(backend):
    """Forward targets (weights, no bucket) and reverse ones (log-probabilities and a bucket)."""
    ids, weights = _sparse_targets(4, 3, 9, seed=3)
    _, logprobs, tail = _sparse_reverse_targets(4, 3, 9, seed=3)
    return [
        (
            (
                _rand(4, 11, seed=0, requires_grad=need_grad),
                ids,
                logprobs if reverse else weights,
                tail if reverse else None,
                _labels(4, 9, 2),
                9,
                1.5,
                0.75,
                0.25,
                -100,
                0.25,
                reverse,
                backend,
                need_grad,
            ),
            need_grad,
        )
        for need_grad in (True, False)
        for reverse in (False, True)
    ]


def _uld_loss_fused(backend):
    return [
        (
            (
                _rand(4, 11, seed=0, requires_grad=need_grad),
                _rand(4, 7, seed=1),
                _labels(4, 11, 2),
                1.5,
                2.0,
                -100,
                0.25,
                backend,
                need_grad,
            ),
            need_grad,
        )
        for need_grad in (True, False)
    ]


def _fused_linear_kd_loss_fused(backend):
    hidden = _rand(6, 5, seed=0, requires_grad=True)
    weight = _rand(11, 5, seed=1, requires_grad=True)
    bias = _rand(11, seed=2, requires_grad=True)
    online = (_rand(6, 4, seed=3), _rand(9, 4, seed=4), None, None)
    offline = (None, None, None, _rand(6, 9, seed=5))
    tail = (_labels(6, 9, 6), None, *_kd_scalars(), 1.0, 1.0, 4, True)
    # reduce=False (reduction="none") computes the loss only; its backward runs the chunks again.
    return [
        ((hidden, weight, bias, *teacher, *tail, True, backend, True, True, True), True)
        for teacher in (online, offline)
    ] + [((hidden, weight, None, *offline, *tail, False, backend, False, False, False), False)]


def _fused_linear_sparse_kd_loss_fused(backend):
    ids, weights = _sparse_targets(6, 3, 9, seed=3)
    _, logprobs, tail = _sparse_reverse_targets(6, 3, 9, seed=3)
    return [
        (
            (
                _rand(6, 5, seed=0, requires_grad=True),
                _rand(11, 5, seed=1, requires_grad=True),
                None,
                ids,
                logprobs if reverse else weights,
                tail if reverse else None,
                _labels(6, 9, 2),
                None,
                9,
                1.5,
                0.75,
                0.25,
                -100,
                0.25,
                1.0,
                4,
                True,
                reduce,
                reverse,
                backend,
                reduce,
                reduce,
                False,
            ),
            reduce,
        )
        for reduce in (True, False)
        for reverse in (False, True)
    ]


def _fused_linear_logprobs_fused(backend):
    hidden = _rand(6, 5, seed=0, requires_grad=True)
    weight = _rand(11, 5, seed=1, requires_grad=True)
    bias = _rand(11, seed=2, requires_grad=True)
    # The forward computes the outputs only (no row_grads, no need flags); the backward runs
    # the op again with the outputs' incoming gradients.
    return [
        (
            (
                hidden,
                weight,
                b,
                _labels(6, 11, 3),
                None,
                1.5,
                -100,
                0.75,
                4,
                False,
                entropy,
                backend,
                False,
                False,
                False,
            ),
            False,
        )
        for b, entropy in ((bias, True), (None, False))
    ]


def _fused_linear_topk_fused(backend):
    return [
        ((_rand(6, 5, seed=0), _rand(11, 5, seed=1), bias, k, 0.5, 1.0, 4, backend), False)
        for bias, k in ((_rand(11, seed=2), 3), (None, 11))
    ]


def _fused_linear_support_fused(backend):
    ids = torch.tensor([[0, 4, -1], [10, 2, 3], [5, -1, -1], [1, 7, 9], [6, 8, 0], [3, 2, 1]])
    return [
        ((_rand(6, 5, seed=0), _rand(11, 5, seed=1), bias, ids, 0.5, 1.0, 4, backend), False)
        for bias in (_rand(11, seed=2), None)
    ]


def _sinkhorn_problem():
    cost = _rand(2, 4, 5, seed=0).abs()
    a = torch.full((2, 4), 0.25)
    b = torch.full((2, 5), 0.2)
    return cost, a, b


def _sinkhorn_solve(backend):
    cost, a, b = _sinkhorn_problem()
    return [
        (
            (
                cost,
                log_weights(a),
                log_weights(b),
                None,
                None,
                None,
                init_g,
                0.1,
                0.5,
                50,
                5,
                1e-6,
                plan,
                backend,
            ),
            False,
        )
        for init_g, plan in ((None, True), (torch.zeros(2, 5), False))
    ]


def _sinkhorn_loss_envelope(backend):
    cost, a, b = _sinkhorn_problem()
    return [
        (
            (
                cost.requires_grad_(),
                a.requires_grad_(),
                b,
                None,
                None,
                None,
                0.1,
                0.5,
                50,
                5,
                1e-6,
                value,
                backend,
            ),
            False,
        )
        for value in ("objective", "transport")
    ]


# Custom op -> (the registered op whose backends it runs; "kernels" where the custom op takes
# only the kernel backends, the reference being plain PyTorch outside it, else "all"; a function
# of a backend giving its cases).
SAMPLES = {
    "kd_loss_fused": ("kd_loss", "kernels", _kd_loss_fused),
    "sparse_kd_loss_fused": ("sparse_kd_loss", "kernels", _sparse_kd_loss_fused),
    "uld_loss_fused": ("uld_loss", "kernels", _uld_loss_fused),
    "fused_linear_kd_loss_fused": ("fused_linear_kd_loss", "kernels", _fused_linear_kd_loss_fused),
    "fused_linear_sparse_kd_loss_fused": (
        "sparse_kd_loss",
        "kernels",
        _fused_linear_sparse_kd_loss_fused,
    ),
    "fused_linear_logprobs_fused": ("fused_linear_logprobs", "all", _fused_linear_logprobs_fused),
    "fused_linear_topk_fused": ("fused_linear_topk", "all", _fused_linear_topk_fused),
    "fused_linear_support_fused": ("fused_linear_support", "all", _fused_linear_support_fused),
    "sinkhorn_solve": ("sinkhorn", "all", _sinkhorn_solve),
    "sinkhorn_loss_envelope": ("sinkhorn", "all", _sinkhorn_loss_envelope),
}


OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)

_RESCALED_IN_PLACE = pytest.mark.xfail(
    raises=OpCheckError,
    strict=True,
    reason="the eager backward rescales the op's gradient outputs in place; opcheck compares "
    "outputs after the backward (see the module docstring)",
)


def _samples():
    """(custom op, case id, arguments, rescaled in place, marks) of every case."""
    out = []
    for name in _fastkd_custom_ops():
        if name not in SAMPLES:
            continue  # test_every_custom_op_has_samples reports it
        op, which, make = SAMPLES[name]
        backends = (
            kernel_backends(op, "cpu")
            if which == "kernels"
            else fastkd.available_backends(op, "cpu")
        )
        for backend in backends:
            marks = [pytest.mark.triton] if backend_spec(op, backend).needs_triton else []
            for i, (args, rescaled) in enumerate(make(backend)):
                out.append((name, f"{name}-{backend}-{i}", args, rescaled, marks))
    return out


def _opcheck_cases():
    # The AOT-dispatch check compiles the op (1 to 8 s a case here, 60 s in all): slow.
    return [
        pytest.param(
            name,
            args,
            check,
            id=f"{case}-{check}",
            marks=marks
            + ([pytest.mark.slow] if check == "test_aot_dispatch_dynamic" else [])
            + ([_RESCALED_IN_PLACE] if rescaled and check == "test_aot_dispatch_dynamic" else []),
        )
        for name, case, args, rescaled, marks in _samples()
        for check in OPCHECK_TESTS
    ]


def test_every_custom_op_has_samples():
    assert _fastkd_custom_ops(), "import fastkd registered no torch.ops.fastkd custom op"
    assert set(_fastkd_custom_ops()) == set(SAMPLES)


@pytest.mark.parametrize("name,args,check", _opcheck_cases())
def test_opcheck(name, args, check):
    torch.library.opcheck(getattr(torch.ops.fastkd, name).default, args, test_utils=check)


@pytest.mark.parametrize(
    "name,args",
    [
        pytest.param(name, args, id=case, marks=marks)
        for name, case, args, rescaled, marks in _samples()
        if rescaled
    ],
)
@pytest.mark.slow  # torch.compile of each op: 14 s in all
def test_rescaled_gradients_match_compiled(name, args):
    op = getattr(torch.ops.fastkd, name).default
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def grads(f):
        # The loss is the only differentiable output.
        return torch.autograd.grad(f(*args)[0].sum(), inputs)

    torch._dynamo.reset()
    compiled = torch.compile(op, backend="aot_eager", dynamic=True, fullgraph=True)
    torch.testing.assert_close(grads(compiled), grads(op))


# ---- the declarations -----------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(ops()))
def test_declarations_are_consistent(op):
    spec = ops()[op]
    assert spec.backends["torch"].is_reference
    for name, backend in spec.backends.items():
        assert name in BACKENDS and backend.name == name
        if backend.triton_module is not None:
            assert importlib.util.find_spec(f"fastkd.triton.{backend.triton_module}"), name
        if backend.native_symbol is not None:
            assert backend.devices == (name,), name
        assert backend.is_reference or backend.dtypes is not None, name
    for order in spec.auto.values():
        assert order[-1] == "torch", "auto ends at the reference, which runs anywhere"


@pytest.mark.parametrize("op", sorted(ops()))
def test_auto_takes_the_reference_for_inputs_no_kernel_accepts(op):
    cpu = torch.device("cpu")
    assert resolve_backend(op, "auto", cpu, dtypes=(torch.float64,)) == "torch"
    assert resolve_backend(op, "auto", cpu, prefer_reference=True) == "torch"
    assert resolve_backend(op, "auto", cpu) == fastkd.available_backends(op, cpu)[0]
    for backend in fastkd.available_backends(op, cpu):
        assert accepts(op, backend, dtypes=(torch.float32,))
        assert accepts(op, backend, dtypes=(torch.float64,)) == backend_spec(op, backend).float64


def test_interpreted_backends():
    assert interpreted("kd_loss", "triton", "cpu")
    assert not interpreted("kd_loss", "triton", "cuda")
    assert not interpreted("kd_loss", "cpu", "cpu")


def test_unknown_op_and_backend():
    with pytest.raises(ValueError, match="unknown op"):
        fastkd.available_backends("nope", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("kd_loss", "nope", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no Triton kernel for priority_sample"):
        resolve_backend("priority_sample", "triton", torch.device("cpu"))


def test_registrations_name_the_arguments_they_need():
    """Autograd and fake registrations find an op's arguments by name in its schema: a name
    that is not an argument, or a chunked op whose arguments are not (hidden, weight, bias,
    ..., need_hidden, need_weight, need_bias), fails when the op is registered."""
    from fastkd.ops._chunked_lm_head import register_chunked_autograd
    from fastkd.ops._fused_rows import register_stored_grad_autograd
    from fastkd.ops._op_args import OpArgs
    from fastkd.ops.kd_loss import kd_loss_fused

    args = OpArgs(kd_loss_fused)
    assert args.names[:3] == ("student", "teacher", "labels") and len(args) == 15
    assert args.bind(range(15)).grad_scale == args.index("grad_scale")
    with pytest.raises(ValueError, match=r"fastkd::kd_loss_fused has no argument 'scale'; its"):
        args.index("scale")
    with pytest.raises(ValueError, match="has no argument 'gradient_scale'"):
        register_stored_grad_autograd(kd_loss_fused, grad_scale="gradient_scale")
    with pytest.raises(ValueError, match=r"must start with \('hidden', 'weight', 'bias'\)"):
        register_chunked_autograd(kd_loss_fused)


def test_constant_for_compile_marks_as_torch_does():
    """The registry's availability checks are constants for torch.compile through the attribute
    that torch.compiler.assume_constant_result sets; both must leave a function alike."""
    from fastkd.ops._registry import constant_for_compile

    def ours():
        return 1

    def torchs():
        return 1

    assert constant_for_compile(ours) is ours
    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}


def test_import_does_not_load_the_compiler():
    """``import fastkd`` leaves torch._dynamo unloaded (2.5 s of a 5.5 s import on 2 cores)."""
    import subprocess
    import sys

    code = "import sys, fastkd; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _no_grad_cases():
    def kd(s, t, labels, reduction):
        hard_weight = 0.0 if labels is None else 0.2
        return fastkd.kd_loss(
            s, t, divergence="jsd", labels=labels, hard_weight=hard_weight, reduction=reduction
        )

    targets = fastkd.sample_teacher(make_logits((3, 5), 40, seed=1), num_samples=16, seed=3)

    def sparse(s, t, labels, reduction):
        return fastkd.sparse_kd_loss(s, targets, labels=labels, reduction=reduction)

    def uld(s, t, labels, reduction):
        return fastkd.uld_loss(s, t[..., :30], labels=labels, reduction=reduction)

    return [
        ("kd_loss", "kd_loss_fused", kd),
        ("sparse_kd_loss", "sparse_kd_loss_fused", sparse),
        ("uld_loss", "uld_loss_fused", uld),
    ]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "module,op,run", _no_grad_cases(), ids=lambda c: c if isinstance(c, str) else ""
)
def test_no_grad_calls_skip_the_custom_op_only_in_plain_eager_mode(
    monkeypatch, module, op, run, reduction
):
    """Without autograd, plain eager calls of the loss ops run their kernel directly (the custom
    op's Python layers cost more than the kernel at small sizes) and give the op's very bits;
    under a FakeTensor, torch-function or dispatch mode, and under torch.jit.trace, the call goes
    through the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class DispatchPassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    op_module = importlib.import_module(f"fastkd.ops.{module}")  # fastkd.ops.<name> is the function
    s, t = make_logits((3, 5), 40, seed=0), make_logits((3, 5), 40, seed=1)
    labels = torch.tensor([[1, -100, 3, 4, 5]] * 3)
    through_op = run(s.clone().requires_grad_(), t, labels, reduction).detach()
    calls = []
    real_op = getattr(op_module, op)
    monkeypatch.setattr(op_module, op, lambda *a: calls.append(1) or real_op(*a))
    with torch.no_grad():
        direct = run(s, t, labels, reduction)
    assert not calls and torch.equal(direct, through_op)
    with PassThrough(), torch.no_grad():
        run(s, t, labels, reduction)
    with DispatchPassThrough(), torch.no_grad():
        run(s, t, labels, reduction)
    with torch.no_grad():  # under tracing, sizes taken from shapes are tensors
        traced = torch.jit.trace(lambda s, t: run(s, t, None, reduction), (s, t), check_trace=False)
        torch.testing.assert_close(traced(s, t), run(s, t, None, reduction), rtol=0, atol=0)
    assert len(calls) == 3
    if module == "sparse_kd_loss":  # its targets' checks read values: no FakeTensorMode
        return
    with FakeTensorMode() as mode, torch.no_grad():
        fake = run(mode.from_tensor(s), mode.from_tensor(t), None, reduction)
    assert len(calls) == 4 and type(fake) is not torch.Tensor


def test_kernels_refuse_fake_tensors():
    """A launch on a FakeTensor raises instead of sending the kernel to address 0 (it segfaulted);
    sample_teacher has no custom op, so it reaches the launch under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    logits = make_logits(3, 40)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(logits)
        with pytest.raises(RuntimeError, match="fake tensor: it has no data"):
            fastkd.sample_teacher(fake, num_samples=8, backend="cpu")
