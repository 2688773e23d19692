"""The fused chunked cross-entropy against F.cross_entropy on full logits, and causal_lm_loss
against transformers' own `model(..., labels=...).loss`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import splice
from splice.train.loss import causal_lm_loss, linear_cross_entropy

LOSS_TOL = {"rtol": 1e-6, "atol": 1e-7}
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-5}


class LargestAllocation(TorchDispatchMode):
    """Records the largest fresh tensor storage (bytes) any op creates; views and in-place
    results, which share an input's storage, do not count."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
                self.shapes.add(tuple(t.shape))
        return out


def make_inputs(n, vocab, dim, ignored=(), bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g, dtype=dtype) / dim**0.5).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[list(ignored)] = -100
    return hidden, weight, b, labels


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def check_against_full_logits(n, vocab, dim, chunk, ignored=(), bias=True):
    hidden, weight, b, labels = make_inputs(n, vocab, dim, ignored, bias)
    ours = linear_cross_entropy(hidden, weight, labels, b, chunk_size=chunk)
    logits = hidden @ weight.T + (b if b is not None else 0)              # (N, V)
    ref = F.cross_entropy(logits, labels, ignore_index=-100)
    torch.testing.assert_close(ours, ref, **LOSS_TOL)
    for got, want in zip(grads_of(ours, hidden, weight, b), grads_of(ref, hidden, weight, b)):
        torch.testing.assert_close(got, want, **GRAD_TOL)


@pytest.mark.parametrize("n, vocab, dim, chunk, ignored", [
    (64, 100, 16, 16, ()),                  # chunk divides N
    (50, 100, 16, 16, ()),                  # chunk does not divide N
    (10, 257, 8, 1024, ()),                 # chunk > N: one chunk
    (33, 100, 12, 7, range(0, 33, 3)),      # some rows ignored
    (20, 64, 8, 4, range(0, 10)),           # a whole leading block ignored
    (1, 5, 3, 1, ()),                       # one row
])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_full_logits(n, vocab, dim, chunk, ignored, bias):
    check_against_full_logits(n, vocab, dim, chunk, ignored, bias)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), vocab=st.integers(2, 80), dim=st.integers(1, 16),
       chunk=st.integers(1, 50), bias=st.booleans(), data=st.data())
def test_matches_full_logits_property(n, vocab, dim, chunk, bias, data):
    ignored = data.draw(st.lists(st.integers(0, n - 1), max_size=n, unique=True))
    if len(ignored) == n:
        ignored = ignored[1:]  # all-ignored has its own test (F.cross_entropy gives NaN there)
    check_against_full_logits(n, vocab, dim, chunk, ignored, bias)


def test_all_rows_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, b, labels = make_inputs(12, 30, 8, ignored=range(12))
    loss = linear_cross_entropy(hidden, weight, labels, b, chunk_size=5)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hidden, weight, b):
        assert t.grad is not None and torch.isfinite(t.grad).all() and not t.grad.any()


def test_frozen_weight_gets_no_grad_and_no_weight_gradient_work():
    hidden, weight, _, labels = make_inputs(40, 300, 8, bias=False)
    weight.requires_grad_(False)
    mode = LargestAllocation()
    with mode:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=10)
        loss.backward()
    assert weight.grad is None and hidden.grad is not None
    assert (300, 8) not in mode.shapes  # no (V, d) weight gradient was ever allocated
    ref = F.cross_entropy(hidden.detach() @ weight.T, labels)
    torch.testing.assert_close(loss, ref, **LOSS_TOL)


def test_trainable_weight_allocates_its_gradient():
    hidden, weight, _, labels = make_inputs(40, 300, 8, bias=False)
    mode = LargestAllocation()
    with mode:
        linear_cross_entropy(hidden, weight, labels, chunk_size=10).backward()
    assert (300, 8) in mode.shapes and weight.grad is not None


def test_no_grad_does_no_gradient_work():
    hidden, weight, b, labels = make_inputs(40, 300, 8)
    mode = LargestAllocation()
    with torch.no_grad(), mode:
        loss = linear_cross_entropy(hidden, weight, labels, b, chunk_size=10)
    assert not loss.requires_grad
    assert (300, 8) not in mode.shapes and (40, 8) not in mode.shapes


def test_grad_output_scales_the_stored_gradients():
    hidden, weight, b, labels = make_inputs(30, 50, 8, ignored=[1, 2])
    ours = 3.5 * linear_cross_entropy(hidden, weight, labels, b, chunk_size=7)
    ref = 3.5 * F.cross_entropy(hidden @ weight.T + b, labels)
    for got, want in zip(grads_of(ours, hidden, weight, b), grads_of(ref, hidden, weight, b)):
        torch.testing.assert_close(got, want, **GRAD_TOL)


def test_second_backward_through_a_retained_graph_raises():
    hidden, weight, b, labels = make_inputs(10, 20, 4)
    loss = linear_cross_entropy(hidden, weight, labels, b, chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()


def test_bf16_hidden_matches_transformers_style_upcast():
    hidden, weight, _, labels = make_inputs(48, 200, 16, ignored=[0, 5], bias=False,
                                            dtype=torch.bfloat16)
    ours = linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    ref = F.cross_entropy((hidden @ weight.T).float(), labels)  # bf16 head, fp32 loss
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    got, want = grads_of(ours, hidden, weight), grads_of(ref, hidden, weight)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-3)


def test_largest_allocation_is_one_chunk_of_logits():
    n, vocab, dim, chunk = 512, 1000, 16, 64
    hidden, weight, _, labels = make_inputs(n, vocab, dim, bias=False)
    weight.requires_grad_(False)
    ours, full = LargestAllocation(), LargestAllocation()
    with ours:
        linear_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()
    with full:
        F.cross_entropy(hidden @ weight.T, labels).backward()
    assert ours.largest <= chunk * vocab * 4
    assert full.largest >= n * vocab * 4


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden": torch.zeros(3, 4), "weight": torch.zeros(5, 6)}, "weight"),
    ({"labels": torch.zeros(2, dtype=torch.long)}, "labels must have shape"),
    ({"labels": torch.tensor([0, 1, 9])}, r"labels must lie in \[0, 5\)"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_inputs_raise_with_a_message(kwargs, match):
    args = {"hidden": torch.zeros(3, 4), "weight": torch.zeros(5, 4),
            "labels": torch.zeros(3, dtype=torch.long)} | kwargs
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(**args)


# -- causal_lm_loss on transformers models ---------------------------------------------------

def lm_batch(vocab, seed=1):
    """Two rows of 12 tokens: a masked prompt in row 0, right padding in row 1."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def perturb_adapters(model):
    """Non-zero lora_B so the adapters change the output (they start at ΔW = 0)."""
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)


def check_against_model_loss(model, chunk_size=5):
    model.eval()  # GPT-2's dropout would draw different masks in the two forwards
    input_ids, attention_mask, labels = lm_batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    ours = causal_lm_loss(model, input_ids, attention_mask, labels, chunk_size=chunk_size)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_of(ours, *params), grads_of(ref, *params)):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    return params


def test_causal_lm_loss_matches_llama_with_lora(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    perturb_adapters(tiny_llama)
    params = check_against_model_loss(tiny_llama)
    assert params and all(p.shape[0] == 4 or p.shape[1] == 4 for p in params)


def test_causal_lm_loss_matches_gpt2_full_finetune_tied_head(tiny_gpt2):
    head = tiny_gpt2.get_output_embeddings()
    assert head.weight is tiny_gpt2.transformer.wte.weight
    check_against_model_loss(tiny_gpt2)  # every parameter trains, the tied one included


def test_causal_lm_loss_matches_gpt2_with_lora(tiny_gpt2):
    splice.attach(tiny_gpt2, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    perturb_adapters(tiny_gpt2)
    check_against_model_loss(tiny_gpt2)


def test_causal_lm_loss_wrapped_head_uses_checkpointed_chunks(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules=["lm_head"]))
    perturb_adapters(tiny_llama)
    assert type(tiny_llama.get_output_embeddings()) is not torch.nn.Linear
    check_against_model_loss(tiny_llama, chunk_size=4)
    input_ids, attention_mask, labels = lm_batch(tiny_llama.config.vocab_size)
    mode = LargestAllocation()
    with mode:
        causal_lm_loss(tiny_llama, input_ids, attention_mask, labels, chunk_size=4).backward()
    vocab = tiny_llama.config.vocab_size
    assert mode.largest < 2 * 12 * vocab * 4  # well below the (B·T, V) fp32 logits
    assert max(s[0] for s in mode.shapes if len(s) == 2 and s[1] == vocab) <= 4


def test_causal_lm_loss_all_ignored_is_zero(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules=["lm_head", "q_proj"]))
    input_ids, attention_mask, _ = lm_batch(tiny_llama.config.vocab_size)
    labels = torch.full_like(input_ids, -100)
    loss = causal_lm_loss(tiny_llama, input_ids, attention_mask, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any()
               for p in tiny_llama.parameters() if p.requires_grad)


def test_causal_lm_loss_refuses_post_processed_logits(tiny_llama):
    tiny_llama.config.final_logit_softcapping = 30.0
    input_ids, attention_mask, labels = lm_batch(tiny_llama.config.vocab_size)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_loss(tiny_llama, input_ids, attention_mask, labels)


# -- real memory, in a fresh process ---------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import json, torch
    from splice.train.loss import linear_cross_entropy

    def peak_mb():
        return next(int(line.split()[1]) for line in open("/proc/self/status")
                    if line.startswith("VmHWM")) / 1024

    torch.set_num_threads(2)
    n, vocab, dim = 4096, 49152, 576
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim).div_(dim ** 0.5)
    labels = torch.randint(0, vocab, (n,))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark to the current RSS
    base = peak_mb()
    linear_cross_entropy(hidden, weight, labels, chunk_size=256).backward()
    print(json.dumps({"extra_mb": peak_mb() - base}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_stays_far_below_full_logits():
    """N=4096, V=49152, d=576: the fp32 logits alone would be 805 MB; one 256-row chunk is
    50 MB, hidden's gradient 9 MB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # RSS tracks live buffers
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True,
                         check=True, timeout=300, env=env)
    extra_mb = json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]
    assert extra_mb < 150, f"peak RSS grew by {extra_mb:.0f} MB"
