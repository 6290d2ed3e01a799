"""fastkd.compat.liger against Liger-Kernel's own modules (liger-kernel 0.8.5, the `test` extra),
whose Triton kernels run in Triton's CPU interpreter here: every argument combination at small
sizes, fp32, comparing losses and gradients."""

from __future__ import annotations

import pytest
import torch

liger_transformers = pytest.importorskip("liger_kernel.transformers")
liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")

from fastkd.compat import liger as compat  # noqa: E402

ROWS, VOCAB, H_S, H_T = 7, 37, 8, 5
IGNORE = -100


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(rows, vocab, seed, ignored=True, ignore_index=IGNORE):
    labels = torch.randint(0, vocab, (rows,), generator=_gen(seed))
    if ignored:
        labels[::3] = ignore_index
    return labels


def _close(ours, theirs, what):
    # Both sides are fp32 evaluations of one formula in a different order of operations.
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6, msg=what)


def _run_with_grads(fn, *leaves):
    """fn(*leaves) and the gradients of its (first) output with respect to each leaf."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, [None if t.grad is None else t.grad for t in leaves]


# ---- LigerJSD (log-probabilities in) --------------------------------------------------------

JSD_CASES = [
    (beta, labelled, scale)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0)
    for labelled in (False, True)
    for scale in (1.0, 6.0)
]


@pytest.mark.parametrize("beta,labelled,scale", JSD_CASES)
@pytest.mark.slow  # 20 cases, 6 s in Triton's interpreter
def test_jsd_matches_liger(beta, labelled, scale):
    """Loss and the gradient with respect to the logits the log-probabilities come from (the
    gradient with respect to the log-probabilities themselves differs by a multiple of q,
    which the log_softmax removes: see the module's docstring)."""
    zs = torch.randn(ROWS, VOCAB, generator=_gen(0)) * scale
    zt = torch.randn(ROWS, VOCAB, generator=_gen(1)) * scale
    zs.requires_grad_()
    labels = _labels(ROWS, VOCAB, 2) if labelled else None

    def run(module, zs):
        return module(zs.log_softmax(-1), zt.log_softmax(-1), labels)

    ours, (g_ours,) = _run_with_grads(lambda z: run(compat.LigerJSD(beta=beta), z), zs)
    theirs, (g_theirs,) = _run_with_grads(
        lambda z: run(liger_transformers.LigerJSD(beta=beta), z), zs
    )
    _close(ours, theirs, "loss")
    _close(g_ours, g_theirs, "grad")


def test_jsd_ignore_index_is_liger_s():
    zs, zt = (
        torch.randn(ROWS, VOCAB, generator=_gen(0)),
        torch.randn(ROWS, VOCAB, generator=_gen(1)),
    )
    labels = _labels(ROWS, VOCAB, 2, ignore_index=5)
    args = (zs.log_softmax(-1), zt.log_softmax(-1), labels)
    _close(
        compat.LigerJSD(beta=0.3, ignore_index=5)(*args),
        liger_transformers.LigerJSD(beta=0.3, ignore_index=5)(*args),
        "loss",
    )


# ---- LigerKLDIVLoss ----------------------------------------------------------------------------


def liger_kl_div_transcribed(y_pred, y_true, reduction, log_target, eps):
    """Liger's KL divergence as liger_kernel/ops/kl_div.py (0.8.5) computes it, in plain torch:
    ``_kldiv_kernel_forward``'s element terms, then ``kldiv_forward_triton``'s reductions.

    LigerKLDIVLoss cannot run in Triton's CPU interpreter: its forward kernel calls
    ``eps.to(tl.float32)`` on the scalar argument ``eps``, which the interpreter passes as a
    Python float (AttributeError: 'float' object has no attribute 'to')."""
    if log_target:
        terms = y_true.exp() * (y_true - y_pred)
    else:
        terms = y_true * (torch.maximum(y_true, torch.tensor(eps)).log() - y_pred)
    rows, vocab = y_pred.shape
    if reduction == "none":
        return terms
    total = terms.sum()
    return {"sum": total, "batchmean": total / rows, "mean": total / (rows * vocab)}[reduction]


def test_liger_kl_div_cannot_run_in_the_interpreter():
    """Holds the reason the KL tests compare against a transcription: where Liger's kernel runs
    (on a GPU, or a later interpreter), it is compared directly instead."""
    y_pred = torch.randn(3, 11).log_softmax(-1)
    y_true = torch.randn(3, 11).softmax(-1)
    try:
        value = liger_transformers.LigerKLDIVLoss(reduction="sum")(y_pred, y_true)
    except Exception as err:  # the interpreter's error type is private to triton
        assert "has no attribute 'to'" in str(err)
    else:
        _close(value, liger_kl_div_transcribed(y_pred, y_true, "sum", False, 1e-10), "loss")


KL_CASES = [
    (reduction, log_target, zeros)
    for reduction in compat.KL_REDUCTIONS
    for log_target in (False, True)
    for zeros in (False, True)
]


@pytest.mark.parametrize("reduction,log_target,zeros", KL_CASES)
def test_kl_div_matches_liger_s_math(reduction, log_target, zeros):
    zs = torch.randn(ROWS, VOCAB, generator=_gen(0)) * 3
    zt = torch.randn(ROWS, VOCAB, generator=_gen(1)) * 3
    if (
        zeros
    ):  # teacher probabilities exactly 0 (Liger: 0 * log(eps) = 0; fastkd: outside the support)
        zt[:, :5] = -torch.inf
    y_true = zt.log_softmax(-1) if log_target else zt.softmax(-1)
    zs.requires_grad_()

    def run(fn, z):
        return fn(z.log_softmax(-1), y_true)

    def liger(a, b):
        return liger_kl_div_transcribed(a, b, reduction, log_target, 1e-10)

    module = compat.LigerKLDIVLoss(reduction=reduction, log_target=log_target)
    ours = run(module, zs)
    if log_target and zeros:
        # Liger's exp(y) (y - x) is NaN at y = -inf; fastkd takes 0 log 0 = 0 there, which is
        # Liger's value with those (zero-probability) columns left out.
        assert run(liger, zs).isnan().any()
        kept = slice(5, None)

        def liger(a, b, full=liger):
            value = full(a[:, kept], b[:, kept])
            if reduction == "mean":  # Liger's mean divides by every element, the -inf ones too
                value = value * (VOCAB - 5) / VOCAB
            return value

        if reduction == "none":
            ours = ours[:, kept]
    theirs = run(liger, zs)
    _close(ours, theirs, "loss")
    _, (g_ours,) = _run_with_grads(lambda z: run(module, z).sum(), zs)
    _, (g_theirs,) = _run_with_grads(lambda z: run(liger, z).sum(), zs)
    _close(g_ours, g_theirs, "grad")


def test_kl_div_default_reduction_is_torch_s_mean():
    y_pred, y_true = torch.randn(4, 9).log_softmax(-1), torch.randn(4, 9).softmax(-1)
    _close(
        compat.LigerKLDIVLoss()(y_pred, y_true),
        liger_kl_div_transcribed(y_pred, y_true, "mean", False, 1e-10),
        "loss",
    )


# ---- LigerFusedLinearJSD --------------------------------------------------------------------

FLJSD_CASES = [
    (beta, temperature, labelled)
    for beta in (0.0, 0.3, 0.5, 1.0)
    for temperature in (1.0, 2.5)
    for labelled in (False, True)
]


def _heads(vocab_s=VOCAB, vocab_t=VOCAB, bias=False):
    xs = torch.randn(ROWS, H_S, generator=_gen(3), requires_grad=True)
    ws = torch.randn(vocab_s, H_S, generator=_gen(4), requires_grad=True)
    xt = torch.randn(ROWS, H_T, generator=_gen(5))
    wt = torch.randn(vocab_t, H_T, generator=_gen(6))
    bs = torch.randn(vocab_s, generator=_gen(7), requires_grad=True) if bias else None
    bt = torch.randn(vocab_t, generator=_gen(8)) if bias else None
    return xs, ws, xt, wt, bs, bt


@pytest.mark.parametrize("beta,temperature,labelled", FLJSD_CASES)
@pytest.mark.slow  # 16 cases, 9 s in Triton's interpreter
def test_fused_linear_jsd_matches_liger(beta, temperature, labelled):
    xs, ws, xt, wt, _, _ = _heads()
    labels = _labels(ROWS, VOCAB, 2) if labelled else None
    kw = dict(jsd_beta=beta, temperature=temperature)
    ours, g_ours = _run_with_grads(
        lambda x, w: compat.LigerFusedLinearJSD(**kw)(x, w, xt, wt, labels), xs, ws
    )
    theirs, g_theirs = _run_with_grads(
        lambda x, w: liger_transformers.LigerFusedLinearJSD(**kw)(x, w, xt, wt, labels), xs, ws
    )
    _close(ours, theirs, "loss")
    for name, a, b in zip(("grad_input", "grad_weight"), g_ours, g_theirs):
        _close(a, b, name)


# ---- LigerFusedLinearJSDLoss (the chunked distillation base) ---------------------------------

WEIGHTS = [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.3, 0.9), (-0.2, 1.0)]
FLJSD_LOSS_CASES = [
    dict(weights=w, beta=beta, temperature=temperature, vocab_t=vocab_t, bias=bias, split=split)
    for w in WEIGHTS
    for beta in (0.0, 0.5, 1.0)
    for temperature in (1.0, 2.0)
    for vocab_t in (VOCAB, VOCAB + 6)
    for bias in (False, True)
    for split in (False, True)
    # a table of every weight pair with every option would take 960 cases; these are every
    # option once against the default weights plus every weight pair against each other one
    if w == (0.5, 0.5) or (beta == 0.5 and temperature == 2.0)
]


@pytest.mark.parametrize(
    "case", FLJSD_LOSS_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
@pytest.mark.slow  # 80 cases, 40 s
def test_fused_linear_jsd_loss_matches_liger(case):
    """Including a teacher vocabulary 6 ids larger than the student's, which Liger meets by
    zero-padding the student's logits (vocab_mismatch="pad"), and weights outside [0, 1]."""
    xs, ws, xt, wt, bs, bt = _heads(vocab_t=case["vocab_t"], bias=case["bias"])
    labels = _labels(ROWS, VOCAB, 2)
    w_hard, w_soft = case["weights"]
    kw = dict(
        weight_hard_loss=w_hard,
        weight_soft_loss=w_soft,
        beta=case["beta"],
        temperature=case["temperature"],
        return_soft_hard_loss=case["split"],
        chunk_size=4,
    )
    leaves = (xs, ws) if bs is None else (xs, ws, bs)

    def call(module):
        return lambda x, w, b=None: module(x, w, xt, wt, labels, b, bt)

    ours, g_ours = _run_with_grads(call(compat.LigerFusedLinearJSDLoss(**kw)), *leaves)
    theirs, g_theirs = _run_with_grads(
        call(liger_chunked.LigerFusedLinearJSDLoss(compiled=False, **kw)), *leaves
    )
    for name, a, b in zip(
        ("loss", "soft", "hard"), *((o if case["split"] else (o,)) for o in (ours, theirs))
    ):
        _close(a, b, name)
    for name, a, b in zip(("grad_input", "grad_weight", "grad_bias"), g_ours, g_theirs):
        _close(a, b, name)


def test_fused_linear_jsd_loss_refuses_a_smaller_teacher_vocabulary():
    """Liger cannot run this case (its JSD stacks logits of different widths); fastkd says so."""
    xs, ws, xt, wt, _, _ = _heads(vocab_t=VOCAB - 4)
    with pytest.raises(ValueError, match=r"vocab_mismatch='pad'.*V_s=37.*V_t=33"):
        compat.LigerFusedLinearJSDLoss()(xs, ws, xt, wt, _labels(ROWS, VOCAB - 4, 2))


@pytest.mark.parametrize(
    "build",
    [
        lambda: compat.LigerFusedLinearJSD(temperature=0.0),
        lambda: compat.LigerFusedLinearJSDLoss(temperature=-1.0),
    ],
)
def test_bad_temperature_is_refused_when_built(build):
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        build()


def test_kl_div_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"input and target must have one shape"):
        compat.liger_kl_div(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        compat.liger_kl_div(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")


# The default run checks one case of each slow table above.
@pytest.mark.parametrize(
    "check,args",
    [
        (test_jsd_matches_liger, (0.1, True, 6.0)),
        (test_fused_linear_jsd_matches_liger, (0.3, 2.5, True)),
        (
            test_fused_linear_jsd_loss_matches_liger,
            (
                dict(
                    weights=(0.3, 0.9),
                    beta=0.5,
                    temperature=2.0,
                    vocab_t=VOCAB + 6,
                    bias=True,
                    split=True,
                ),
            ),
        ),
    ],
    ids=["jsd", "fused_linear_jsd", "fused_linear_jsd_loss"],
)
def test_one_case_of_each_table(check, args):
    check(*args)
