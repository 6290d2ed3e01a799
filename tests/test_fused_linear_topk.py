"""fastkd.fused_linear_topk against the whole-logits float64 reference, the exactness of its tail
mass, and its targets in sparse_kd_loss (the top-k forward KL with the exact tail bucket)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.reference.fused_linear_logprobs import fused_linear_topk_reference, topk_tail_reference

from helpers import assert_within_torch_error, op_backend_params

OP = "fused_linear_topk"
N, H, V = 31, 16, 57


def make_head(lead=(N,), *, vocab=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*lead, H, generator=g).to(dtype),
        (torch.randn(vocab, H, generator=g) * (6 / math.sqrt(H))).to(dtype),
        (torch.randn(vocab, generator=g) * 0.5).to(dtype),
    )


def assert_matches(hidden, weight, bias, backend, *, k, **kw):
    targets, log_tail, lse = fastkd.fused_linear_topk(
        hidden, weight, bias=bias, k=k, return_stats=True, backend=backend, **kw
    )
    ref_kw = {key: v for key, v in kw.items() if key not in ("chunk_size", "memory_budget")}
    ids, logprobs, exact_tail, exact_lse = fused_linear_topk_reference(
        hidden.double(), weight.double(), bias.double(), k=k, **ref_kw
    )
    _, plain_lp, plain_tail, plain_lse = fused_linear_topk_reference(
        hidden, weight, bias, k=k, **ref_kw
    )
    lead = hidden.shape[:-1]
    assert targets.ids.shape == (*lead, k) and targets.ids.dtype == torch.int32
    assert (
        targets.method == "topk" and targets.tail == "bucket" and targets.vocab_size == len(weight)
    )
    # The exact log-probs at the ids returned are the exact top k in order (robust to the
    # order of near-ties), and the ids are distinct.
    a = F.linear(hidden.double(), weight.double(), bias.double()) * kw.get("logit_scale", 1.0)
    a = a / kw.get("temperature", 1.0)
    at_ids = a.gather(-1, targets.ids.long().clamp_min(0)) - exact_lse[..., None]
    assert_within_torch_error("logprobs at ids", at_ids, logprobs, plain_lp)
    assert_within_torch_error("logprobs", targets.logprobs, logprobs, plain_lp)
    assert (targets.ids.sort(-1).values.diff(dim=-1) > 0).all()
    assert_within_torch_error("lse", lse, exact_lse, plain_lse)
    assert_within_torch_error("log_tail", log_tail, exact_tail, plain_tail)
    # The targets' weights and tail mass are the exponentials of what was checked above.
    has_mass = targets.ids >= 0
    torch.testing.assert_close(targets.weights, torch.where(has_mass, targets.logprobs.exp(), 0.0))
    torch.testing.assert_close(targets.tail_mass, log_tail.exp())


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
@pytest.mark.parametrize("k", [1, 5, V - 1, V])
@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.25, "chunk_size": 4}, {"temperature": 10.0, "logit_scale": 0.5}],
    ids=["plain", "cold", "hot-scaled"],
)
def test_matches_reference(device, backend, k, options):
    assert_matches(*make_head(), backend, k=k, **{"chunk_size": 7, **options})


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_heads(device, backend, dtype):
    assert_matches(*make_head(seed=1, dtype=dtype), backend, k=4, chunk_size=8)


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
@pytest.mark.parametrize("layout", ["transposed", "stride0", "lead3d"])
def test_layouts(device, backend, layout):
    hidden, weight, bias = make_head(seed=2)
    if layout == "transposed":
        hidden, weight = hidden.t().contiguous().t(), weight.t().contiguous().t()
    elif layout == "stride0":
        hidden = hidden[:1].expand(N, H)
    else:
        hidden = hidden[:30].reshape(2, 15, H)
    if layout == "stride0":  # every row ties with itself: compare with the reference's rows
        targets = fastkd.fused_linear_topk(hidden, weight, bias=bias, k=3, backend=backend)
        first = fastkd.fused_linear_topk(hidden[:1], weight, bias=bias, k=3, backend=backend)
        assert torch.equal(targets.ids, first.ids.expand(N, 3))
        return
    assert_matches(hidden, weight, bias, backend, k=3, chunk_size=4)


def _dominant_logits(log_tail_target: float, vocab: int, k: int) -> torch.Tensor:
    """Logits [1, vocab]: one column L, the rest 0, with L chosen so that the mass outside the
    top k, (vocab - k) / (e^L + vocab - 1), is exp(log_tail_target)."""
    big = math.log((vocab - k) / math.exp(log_tail_target) - (vocab - 1))
    z = torch.zeros(1, vocab, dtype=torch.float64)
    z[0, 3] = big
    return z


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
@pytest.mark.parametrize("log_tail", [-1.0, -5.0, -16.0, -25.0, -60.0])
def test_tail_exact_where_kept_mass_is_near_one(device, backend, log_tail):
    """The tail through an identity head (the logits are the hidden states): its relative error
    stays small where the kept mass is within 1e-6 of 1 (log_tail <= -14), where 1 - sum kept in
    fp32 is all rounding; where the kept mass is far from 1 both ways agree."""
    k = 4
    z = _dominant_logits(log_tail, V, k)
    eye = torch.eye(V)
    targets, got, _ = fastkd.fused_linear_topk(
        z.float().to(device), eye.to(device), k=k, return_stats=True, backend=backend
    )
    exact = math.log(V - k) - torch.logsumexp(z[0], 0).item()  # from the float64 logits
    assert abs(got.item() - exact) < 1e-5 * max(1.0, abs(exact))  # relative error of the mass
    assert abs(targets.tail_mass.item() / math.exp(exact) - 1) < 1e-5
    one_minus_kept = 1 - targets.weights.double().sum().item()  # the other way
    if log_tail > -6:
        assert abs(math.log(one_minus_kept) - exact) < 1e-4
    elif log_tail <= -20:  # below fp32's half-ulp of 1 (3e-8): the difference is rounding
        assert abs(one_minus_kept - math.exp(exact)) > 0.1 * math.exp(exact)


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
def test_neg_inf_logits_pad_and_empty_tail(device, backend):
    hidden, weight, bias = make_head(seed=3)
    bias[3:] = -math.inf  # three columns with mass
    targets, log_tail, _ = fastkd.fused_linear_topk(
        hidden, weight, bias=bias, k=5, return_stats=True, backend=backend
    )
    assert (targets.ids[:, 3:] == -1).all() and (targets.weights[:, 3:] == 0).all()
    assert (targets.ids[:, :3] >= 0).all() and (targets.ids[:, :3] < 3).all()
    assert torch.isneginf(log_tail).all() and (targets.tail_mass == 0).all()
    torch.testing.assert_close(targets.weights.sum(-1), torch.ones(N))


def test_matches_reference_on_whole_logits_float64():
    hidden, weight, bias = make_head(seed=4)
    targets, log_tail, lse = fastkd.fused_linear_topk(
        hidden.double(),
        weight.double(),
        bias=bias.double(),
        k=6,
        return_stats=True,
        backend="torch",
    )
    ids, logprobs, tail, exact_lse = topk_tail_reference(
        F.linear(hidden.double(), weight.double(), bias.double()), 6
    )
    assert torch.equal(targets.ids.long(), ids)
    torch.testing.assert_close(log_tail.double(), tail)
    torch.testing.assert_close(lse.double(), exact_lse)


@pytest.mark.parametrize("device,backend", op_backend_params(OP))
def test_topk_forward_kl_with_exact_tail_bucket(device, backend):
    """fused_linear_topk's targets in fused_linear_sparse_kd_loss give
    sum_k p_k log(p_k / q_k) + p_tail log(p_tail / q_tail), q_tail the student's mass outside
    the teacher's ids, computed here in float64 from whole logits."""
    t_hidden, t_weight, t_bias = make_head(seed=5)
    s_hidden, s_weight, _ = make_head(seed=6)
    k = 6
    targets = fastkd.fused_linear_topk(t_hidden, t_weight, bias=t_bias, k=k, backend=backend)
    loss = fastkd.fused_linear_sparse_kd_loss(s_hidden, s_weight, targets, reduction="none")
    log_p = F.log_softmax(F.linear(t_hidden.double(), t_weight.double(), t_bias.double()), -1)
    log_q = F.log_softmax(F.linear(s_hidden.double(), s_weight.double()), -1)
    top = log_p.topk(k, -1).indices
    kept = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, top, True)
    p_tail = log_p.masked_fill(kept, -math.inf).logsumexp(-1)
    q_tail = log_q.masked_fill(kept, -math.inf).logsumexp(-1)
    p_k, q_k = log_p.gather(1, top), log_q.gather(1, top)
    exact = (p_k.exp() * (p_k - q_k)).sum(-1) + p_tail.exp() * (p_tail - q_tail)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-6)


def test_targets_round_trip_through_teacher_cache(tmp_path):
    hidden, weight, bias = make_head(seed=7)
    targets = fastkd.fused_linear_topk(hidden, weight, bias=bias, k=4)
    with fastkd.TeacherCache.create(
        tmp_path / "cache", vocab_size=V, num_samples=4, method="topk", tail="bucket"
    ) as cache:
        cache.append(targets)
    back = fastkd.TeacherCache.open(tmp_path / "cache")[0]
    assert torch.equal(back.ids, targets.ids)
    torch.testing.assert_close(back.weights, targets.weights)
    torch.testing.assert_close(back.tail_mass, targets.tail_mass)


BAD = [
    ({"k": 0}, ValueError, r"k must be an int in \[1, V\]"),
    ({"k": V + 1}, ValueError, r"k must be an int in \[1, V\]"),
    ({"k": True}, ValueError, "k must be an int"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"memory_budget": 0}, ValueError, "memory_budget"),
    ({"backend": "cuda"}, RuntimeError, "cannot run here"),
]


@pytest.mark.parametrize("override,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_raise(override, error, match):
    hidden, weight, _ = make_head()
    with pytest.raises(error, match=match):
        fastkd.fused_linear_topk(hidden, weight, **{"k": 3, **override})


@pytest.mark.gpu
def test_gpu_matches_reference():
    hidden, weight, bias = (t.cuda() for t in make_head((263,), vocab=32003, seed=8))
    for backend in fastkd.available_backends(OP, "cuda"):
        assert_matches(hidden, weight, bias, backend, k=20)
