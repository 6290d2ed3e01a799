"""Random-sampling targets give an unbiased gradient, top-k does not: the Table 3 experiment of
"Sparse Logit Sampling" (Anshumann et al., ACL 2025) in miniature.

A contextual teacher over a 32k vocabulary (a Zipf-like prior plus a context-dependent term)
and a student with a bias and a linear head on the same context features. The batch gradient
of the student's parameters from N=50 random-sampling targets lies within a few degrees of the
full-KD gradient with a norm ratio near 1; renormalized top-12 targets are far off (here about
10 degrees and 1.5 times the norm, against 2.7 degrees and 1.00 for sampling; the paper:
4 degrees against 58 for 3B -> 300M models).
"""

from __future__ import annotations

import math

import torch

import fastkd

ROWS, VOCAB, FEATURES = 2048, 32000, 16


def _parameter_gradient(loss_fn, student_logits_fn):
    bias = torch.zeros(VOCAB, requires_grad=True)
    weight = torch.zeros(VOCAB, FEATURES, requires_grad=True)
    loss_fn(student_logits_fn(bias, weight)).backward()
    return torch.cat([bias.grad, weight.grad.flatten()]).double()


def test_random_sampling_is_unbiased_and_topk_is_not():
    g = torch.Generator().manual_seed(0)
    prior = -1.1 * torch.log(torch.arange(1, VOCAB + 1, dtype=torch.float32))
    context = torch.randn(ROWS, FEATURES, generator=g)
    teacher_head = torch.randn(VOCAB, FEATURES, generator=g) * (2 / math.sqrt(FEATURES))
    teacher_logits = prior + context @ teacher_head.T

    def student_logits(bias, weight):  # an untrained student: half the prior, no context yet
        return 0.5 * prior + bias + context @ weight.T

    full = _parameter_gradient(
        lambda z: fastkd.kd_loss(z, teacher_logits, divergence="fkl"), student_logits)
    sampled = fastkd.sample_teacher(teacher_logits, num_samples=50, seed=0)
    top12 = fastkd.sample_teacher(teacher_logits, method="topk", k=12, tail="renorm")
    stats = {}
    for name, targets in (("random", sampled), ("top12", top12)):
        grad = _parameter_gradient(lambda z: fastkd.sparse_kd_loss(z, targets), student_logits)
        cos = float(grad @ full / (grad.norm() * full.norm()))
        stats[name] = (math.degrees(math.acos(min(cos, 1.0))), float(grad.norm() / full.norm()))
    distinct = float((sampled.ids >= 0).sum(-1).float().mean())
    angle, ratio = stats["random"]
    assert angle < 6.0 and abs(ratio - 1) < 0.05, (stats, distinct)
    top_angle, top_ratio = stats["top12"]
    assert top_ratio > 1.3 and top_angle > 3 * angle, stats
