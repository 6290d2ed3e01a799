"""The model adapters: a model's hidden states and Head through the fused loss give the loss and
gradients of kd_loss on the model's own logits, for every family whose head differs."""

import functools
import json
import os
import re

import fastkd
import pytest
import torch
from fastkd.train.models import CausalLM, Head, adapt, load_causal_lm, save_causal_lm
from torch import nn

transformers = pytest.importorskip("transformers")

V = 97  # odd, so that no power-of-two size hides a vocabulary-dimension bug
# Larger than the families' default initializer range (0.02): logits of order 1 make the
# distributions far from uniform and Gemma's softcap of 2 bend them, so a head
# transformation left out changes the loss well beyond the tolerances.
_INIT = 0.3
_LLAMA_LIKE = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=_INIT,
)
_GEMMA = dict(_LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0)

# family: (config class, config arguments, expected Head (logit_scale, softcap), tied head)
FAMILIES = {
    "llama": ("LlamaConfig", _LLAMA_LIKE, (1.0, None), False),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE, (1.0, None), False),
    "qwen3": ("Qwen3Config", dict(_LLAMA_LIKE, head_dim=8), (1.0, None), False),
    "mistral": ("MistralConfig", _LLAMA_LIKE, (1.0, None), False),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=_INIT,
        ),
        (1.0, None),
        True,
    ),
    "gemma2": ("Gemma2Config", _GEMMA, (1.0, 2.0), True),
    "gemma3": ("Gemma3TextConfig", _GEMMA, (1.0, 2.0), True),
    "cohere": ("CohereConfig", dict(_LLAMA_LIKE, logit_scale=0.25), (0.25, None), True),
    "granite": ("GraniteConfig", dict(_LLAMA_LIKE, logits_scaling=4.0), (0.25, None), False),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every operation here is tiny ([14, 32] by [32, 97] at most): intra-op threads only add
    their synchronization, which costs seconds per test on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(family: str):
    cls, kwargs, _, _ = FAMILIES[family]
    return getattr(transformers, cls)(**kwargs)


def _hf_model(family: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # eval: GPT-2's dropout is on by default, and the two paths must see the same network.
    return transformers.AutoModelForCausalLM.from_config(_config(family)).eval()


@functools.cache
def _pair(family: str) -> tuple[CausalLM, CausalLM]:
    """Student and teacher: two differently initialized models of one family (built once)."""
    return adapt(_hf_model(family, 1)), adapt(_hf_model(family, 2))


def _batch(seed: int = 0):
    """[2, 7] ids, a mask with the second row right-padded by 2, labels with -100 at the padding
    and at two other tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.randint(0, V, (2, 7), generator=g)
    labels[1, 5:] = -100
    labels[0, 0] = labels[1, 2] = -100
    return ids, mask, labels


def _params(lm: CausalLM) -> dict[str, torch.Tensor]:
    return dict(lm.named_parameters())  # a tied weight appears once


def _fused_loss(student: CausalLM, teacher: CausalLM, ids, mask, **kd):
    head, t_head = student.head(), teacher.head()
    assert head.softcap == t_head.softcap  # one family: kd_loss applies one softcap to both
    with torch.no_grad():
        t_hidden = teacher(ids, mask)
    return fastkd.fused_linear_kd_loss(
        student(ids, mask),
        head.weight,
        t_hidden,
        t_head.weight,
        student_bias=head.bias,
        teacher_bias=t_head.bias,
        logit_scale=head.logit_scale,
        teacher_logit_scale=t_head.logit_scale,
        softcap=head.softcap,
        **kd,
    )


def _plain_loss(student: CausalLM, teacher: CausalLM, ids, mask, **kd):
    # The models' own logits already carry their scale and softcap.
    with torch.no_grad():
        t_logits = teacher.model_logits(ids, mask)
    return fastkd.kd_loss(student.model_logits(ids, mask), t_logits, **kd)


# fp32 throughout. The two paths compute the same functions and differ in rounding only (the
# order of the GEMMs' sums, the kernel evaluating tanh for the softcap): on this CPU they agree
# to the bit except for Gemma, whose largest difference is a tenth of this tolerance. rtol 1e-5
# (~80 float32 epsilons) leaves room for other BLAS blockings through the 2-layer backward;
# atol 1e-7 is 1e-4 of the smallest gradient scale here (jsd on Cohere, |g| <= 6e-4). Leaving
# out a head transformation changes the loss by 80% (Gemma's softcap) to 13x (Cohere's scale).
_TOL = dict(rtol=1e-5, atol=1e-7)
_KD = [dict(divergence="fkl"), dict(divergence="jsd", beta=0.3, temperature=2.0)]


def _assert_same_loss_and_grads(student: CausalLM, teacher: CausalLM, ids, mask, **kd):
    """The fused loss and its gradients w.r.t. every student parameter equal the plain ones."""
    params = _params(student)
    plain = _plain_loss(student, teacher, ids, mask, **kd)
    plain_grads = torch.autograd.grad(plain, list(params.values()))
    fused = _fused_loss(student, teacher, ids, mask, **kd)
    fused_grads = torch.autograd.grad(fused, list(params.values()))
    torch.testing.assert_close(fused, plain, **_TOL)
    for name, fg, pg in zip(params, fused_grads, plain_grads):
        torch.testing.assert_close(
            fg, pg, **_TOL, msg=lambda m, name=name: f"gradient of {name}: {m}"
        )


@pytest.mark.parametrize("kd", _KD, ids=lambda kd: kd["divergence"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_on_adapter_equals_kd_loss_on_model_logits(family, kd):
    student, teacher = _pair(family)
    ids, mask, labels = _batch()
    _assert_same_loss_and_grads(student, teacher, ids, mask, labels=labels, **kd)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapt_describes_the_head(family):
    _, _, (scale, softcap), tied = FAMILIES[family]
    student, _ = _pair(family)
    head = student.head()
    hf = student.model
    assert (head.logit_scale, head.softcap) == (scale, softcap)
    assert head.weight is hf.get_output_embeddings().weight
    assert (head.weight is hf.get_input_embeddings().weight) == tied
    assert (student.vocab_size, student.hidden_size) == (V, 32)
    assert all(k.startswith("model.") for k in student.state_dict())
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            head.logits(student(ids, mask)), student.model_logits(ids, mask), rtol=0, atol=0
        )


def test_tied_head_gradient_reaches_the_shared_embedding_once():
    student, teacher = _pair("gpt2")
    shared = student.model.transformer.wte.weight
    assert student.head().weight is shared
    assert sum(p is shared for p in student.parameters()) == 1
    ids, mask, labels = _batch(1)
    grads = []
    for loss_fn in (_plain_loss, _fused_loss):
        student.zero_grad(set_to_none=True)
        loss_fn(student, teacher, ids, mask, labels=labels).backward()
        grads.append(shared.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], **_TOL)
    # Both uses contribute: the head's rows and the input embedding's (the ids' rows).
    head_only = torch.autograd.grad(
        fastkd.kd_loss(
            student.head().logits(student(ids, mask).detach()),
            teacher.model_logits(ids, mask).detach(),
            labels=labels,
        ),
        shared,
    )[0]
    assert not torch.allclose(grads[1], head_only, **_TOL)
    student.zero_grad(set_to_none=True)


class _Body(nn.Module):
    """A toy body with the from_parts calling convention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.mix = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, input_ids, attention_mask=None):
        x = torch.tanh(self.mix(self.embed(input_ids)))
        if attention_mask is not None:
            x = x * attention_mask[..., None]
        return self.norm(x)


def test_from_parts_linear_head_with_bias():
    torch.manual_seed(0)
    student = CausalLM.from_parts(_Body(), nn.Linear(16, V), logit_scale=0.5)
    teacher = CausalLM.from_parts(_Body(), nn.Linear(16, V), logit_scale=0.5)
    head = student.head()
    assert head.bias is student.model.lm_head.bias and head.logit_scale == 0.5
    assert (student.vocab_size, student.hidden_size) == (V, 16)
    assert {k.split(".")[1] for k in student.state_dict()} == {"body", "lm_head"}
    ids, mask, labels = _batch()
    with torch.no_grad():  # the plain path: Linear then the scale
        torch.testing.assert_close(
            student.model_logits(ids, mask), 0.5 * student.model.lm_head(student(ids, mask))
        )
    for kd in _KD:
        _assert_same_loss_and_grads(student, teacher, ids, mask, labels=labels, **kd)


def test_from_parts_tensor_heads():
    body = _Body()
    bias = nn.Parameter(torch.zeros(V))
    tied = CausalLM.from_parts(body, body.embed.weight, bias=bias, softcap=3.0)
    assert tied.head().weight is body.embed.weight and tied.head().bias is bias
    assert sum(p is body.embed.weight for p in tied.parameters()) == 1
    frozen = CausalLM.from_parts(_Body(), torch.randn(V, 16))
    assert not any(p is frozen.head().weight for p in frozen.parameters())
    assert "model.lm_head.weight" in frozen.state_dict()


@pytest.mark.parametrize(
    "head, bias, error, match",
    [
        (
            nn.Linear(16, V),
            torch.zeros(V),
            ValueError,
            "bias must be None when head is an nn.Linear",
        ),
        ("lm_head", None, TypeError, "head must be an nn.Linear or a \\[V, H\\] weight tensor"),
        (torch.zeros(V), None, ValueError, "Head.weight must be a tensor of shape \\[V, H\\]"),
        (torch.zeros(V, 16), torch.zeros(V + 1), ValueError, "Head.bias must be None or a tensor"),
    ],
)
def test_from_parts_errors(head, bias, error, match):
    with pytest.raises(error, match=match):
        CausalLM.from_parts(_Body(), head, bias=bias)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logit_scale=0.0), "Head.logit_scale must be a finite nonzero number; got 0.0"),
        (dict(softcap=-1.0), "Head.softcap must be a finite number > 0; got -1.0"),
    ],
)
def test_head_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Head(torch.zeros(V, 16), **kwargs)


def _patched_logits(model: nn.Module, transform) -> nn.Module:
    """``model`` whose forward returns ``transform(logits)``: a head adapt cannot know of."""
    forward = model.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = transform(out.logits)
        return out

    model.forward = patched
    return model


@pytest.mark.parametrize(
    "transform, match",
    [
        (lambda z: z + 1.0, "adds 1 to every logit"),
        (lambda z: 3.0 * z, "multiplies the logits by a further 3"),
        (torch.sin, "in another way than a shift, a scale or a softcap"),
    ],
)
def test_verify_rejects_a_head_it_cannot_describe(transform, match):
    model = _patched_logits(_hf_model("llama", 0), transform)
    with pytest.raises(ValueError, match="adapt\\(LlamaForCausalLM\\).*" + match) as info:
        adapt(model)
    assert "CausalLM.from_parts" in str(info.value)
    assert isinstance(adapt(model, verify=False), CausalLM)


@pytest.mark.parametrize(
    "family, field, value, match",
    [
        # Cohere reads logit_scale once, at construction: a later config edit is not the model.
        ("cohere", "logit_scale", 0.5, "logit_scale=0.5.*multiplies the logits by a further 0.5"),
        # A softcap in the config of a model that applies none (as a composite model's text
        # config can be).
        (
            "llama",
            "final_logit_softcapping",
            2.0,
            "softcap=2.0.*does not cap its logits although its config sets final_logit_softcapping",
        ),
    ],
)
def test_verify_catches_a_config_that_disagrees_with_the_model(family, field, value, match):
    model = _hf_model(family, 0)
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=f"adapt\\({type(model).__name__}\\).*{match}"):
        adapt(model)


def test_verify_restores_train_and_eval_modes():
    model = _hf_model("gpt2", 0).train()
    model.transformer.h[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    adapt(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert modes[""] and not modes["transformer.h.0"]


@pytest.mark.parametrize("model", [nn.Linear(3, 4), "model"], ids=["module", "str"])
def test_adapt_rejects_what_is_not_a_causal_lm(model):
    with pytest.raises(TypeError, match="adapt\\(.*CausalLM.from_parts"):
        adapt(model)


def test_adapt_rejects_a_model_without_head():
    base = transformers.LlamaModel(_config("llama"))
    with pytest.raises(
        TypeError,
        match="adapt\\(LlamaModel\\): not a Hugging Face causal LM with "
        "an output head.*CausalLM.from_parts",
    ):
        adapt(base)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("config_only")
    _config("llama").save_pretrained(path)
    return path


def _state(lm: CausalLM) -> dict:
    return {k: v.clone() for k, v in lm.state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_load_random_init_from_config_is_deterministic(config_dir, tmp_path):
    rng = torch.random.get_rng_state()
    first = load_causal_lm(config_dir, seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random state is kept
    assert isinstance(first.model, transformers.LlamaForCausalLM) and not first.training
    _assert_same(_state(first), _state(load_causal_lm(str(config_dir), seed=5)))
    assert not torch.equal(first.head().weight, load_causal_lm(config_dir, seed=6).head().weight)
    # A bare .json config file initializes the same model.
    json_file = tmp_path / "tiny.json"
    json_file.write_text((config_dir / "config.json").read_text())
    _assert_same(_state(first), _state(load_causal_lm(json_file, seed=5)))
    half = load_causal_lm(config_dir, dtype=torch.bfloat16, seed=5)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_gives_identical_logits(config_dir, tmp_path, dtype):
    lm = load_causal_lm(config_dir, dtype=dtype, seed=3)
    save_causal_lm(lm, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "llama"
    assert os.path.isfile(tmp_path / "saved" / "model.safetensors")
    loaded = load_causal_lm(tmp_path / "saved")  # dtype None keeps the checkpoint's
    _assert_same(_state(lm), _state(loaded))
    ids, mask, _ = _batch()
    with torch.no_grad():
        assert torch.equal(loaded.model_logits(ids, mask), lm.model_logits(ids, mask))
        assert torch.equal(loaded(ids, mask), lm(ids, mask))


def test_load_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"path '{missing}' does not exist")):
        load_causal_lm(missing)
    no_config = re.escape(f"directory '{tmp_path}' has no config.json")
    with pytest.raises(FileNotFoundError, match=no_config):
        load_causal_lm(tmp_path)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file but not a .json config"):
        load_causal_lm(weights)


def test_save_rejects_a_model_from_parts(tmp_path):
    with pytest.raises(TypeError, match="saves a CausalLM made by adapt.*from_parts"):
        save_causal_lm(CausalLM.from_parts(_Body(), nn.Linear(16, V)), tmp_path)
