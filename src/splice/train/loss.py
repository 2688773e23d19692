"""Causal-LM cross-entropy that never materialises the full (tokens × vocab) logits.

    loss = (1/n) Σᵢ [logsumexp(W hᵢ + b) − (W hᵢ + b)[yᵢ]]   over the n rows with yᵢ ≠ ignore_index

`linear_cross_entropy` fuses the output head and the loss; `causal_lm_loss` runs a transformers
causal LM's backbone and feeds only the supervised positions to it. See Note: Fused loss and
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# Note: Fused loss and gradient
# With the head W (V, d) and N tokens, the logits Z = H Wᵀ are (N, V): for SmolLM2 (V = 49,152)
# at 4 × 256 tokens that is 200 MB in fp32, and autograd keeps them (or their softmax) alive
# until backward and then allocates a gradient of the same size. But the gradient of the mean
# cross-entropy has a closed form per row,
#     ∂loss/∂zᵢ = (softmax(zᵢ) − onehot(yᵢ)) / n,
# so ∂loss/∂H = G W, ∂loss/∂W = Gᵀ H and ∂loss/∂b = Σᵢ gᵢ, where G is that (N, V) matrix. All
# three are sums over rows, so we walk the rows in chunks of c: compute one chunk's logits
# (c, V) in fp32, its logsumexp and loss, turn the logits into G in place, multiply G out into
# the gradients, and drop the chunk. The forward therefore already holds every gradient; the
# backward only scales them by grad_output (the loss is linear in its own scale). Peak extra
# memory is one chunk's logits plus the gradients themselves (the size of H, and of W only when
# W is trainable), and nothing is recomputed. The price: the gradients are computed even if
# backward never runs, so evaluate under torch.no_grad() (then no gradient work is done).


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean CE of hidden @ weight.T + bias over rows whose label is valid. See Note: Fused loss
    and gradient. Labels here are already filtered: every row counts."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, needs):
        # hidden (n, d), weight (V, d), bias (V,) or None, labels (n,) in [0, V)
        need_hidden, need_weight, need_bias = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        compute = torch.promote_types(hidden.dtype, weight.dtype)       # the matmul dtype
        acc = torch.promote_types(compute, torch.float32)               # fp32 (or fp64)
        w = weight.to(compute)                                          # (V, d)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format
                                       ) if need_hidden else None        # (n, d)
        grad_weight = torch.zeros(weight.shape, dtype=acc,
                                  device=weight.device) if need_weight else None  # (V, d)
        grad_bias = torch.zeros(vocab, dtype=acc,
                                device=weight.device) if need_bias else None     # (V,)
        # One logits buffer for every chunk: a fresh (c, V) allocation per chunk is a fresh
        # mmap whose pages are faulted in and zeroed again each time.
        buffer = torch.empty(min(chunk_size, n), vocab, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(compute)            # (c, d)
            y = labels[start:start + chunk_size]                        # (c,)
            logits = buffer[:h.shape[0]]                                # (c, V)
            if compute == acc:
                torch.mm(h, w.T, out=logits)
            else:
                logits.copy_(h @ w.T)
            if bias is not None:
                logits += bias.to(acc)
            target = logits.gather(1, y[:, None])                       # (c, 1)
            # logsumexp by hand, in place: torch.logsumexp would allocate a second (c, V)
            top = logits.amax(1, keepdim=True)                          # (c, 1)
            g = logits.sub_(top).exp_()                                 # (c, V) unnormalised
            norm = g.sum(1, keepdim=True)                               # (c, 1)
            total += (top + norm.log() - target).sum()
            if any(needs):
                g.div_(norm)                                            # (c, V) softmax
                g.scatter_add_(1, y[:, None], torch.full_like(target, -1))  # − onehot
                _accumulate(g, h, w, grad_hidden, grad_weight, grad_bias, start)
        # Kept as attributes, not saved tensors, so backward can hand them over without a copy.
        ctx.grads = [t.mul_(1.0 / n) if t is not None else None
                     for t in (grad_hidden, grad_weight, grad_bias)]
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were already used by an earlier "
                               "backward; call the loss again instead of retain_graph=True")
        grads, ctx.grads = ctx.grads, None  # ours alone now: scale in place, autograd keeps it
        grads = [None if g is None else g.mul_(grad_output).to(dtype)
                 for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None)


def _accumulate(g, h, w, grad_hidden, grad_weight, grad_bias, start) -> None:
    """Add one chunk's (unscaled) gradients: g (c, V) = softmax − onehot, h (c, d)."""
    g_mm = g.to(w.dtype)                                                # (c, V), a copy if bf16
    if grad_hidden is not None:
        rows = grad_hidden[start:start + g.shape[0]]                    # (c, d), contiguous
        if rows.dtype == w.dtype:
            torch.mm(g_mm, w, out=rows)
        else:
            rows.copy_(g_mm @ w)
    if grad_weight is not None:
        if g_mm.dtype == grad_weight.dtype:
            grad_weight.addmm_(g_mm.T, h)                               # (V, d), no temporary
        else:
            grad_weight += g_mm.T @ h                                   # (V, d) in bf16, then fp32
    if grad_bias is not None:
        grad_bias += g.sum(0)                                           # (V,)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_size: int = 1024,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against `labels`, without the full logits.

    hidden (N, d), weight (V, d), bias (V,) or None, labels (N,) -> scalar fp32. Rows whose label
    is `ignore_index` are skipped; if every row is skipped the loss is 0 with zero gradients.
    The head is evaluated `chunk_size` rows at a time (matmul in the inputs' dtype, logits and
    sums in fp32), gradients are formed in the same pass (see Note: Fused loss and gradient),
    and a weight or bias that does not require grad costs no gradient work. `chunk_size` trades
    peak memory (chunk_size × V × 4 bytes: 200 MB at 1024 rows for a 49k vocabulary) for fewer,
    larger matmuls.
    """
    _check_inputs(hidden, weight, labels, bias, chunk_size)
    keep = labels != ignore_index                                       # (N,)
    all_kept = bool(keep.all())
    rows = hidden if all_kept else hidden[keep]                         # (n, d)
    targets = labels if all_kept else labels[keep]                      # (n,)
    if rows.shape[0] == 0:
        return _zero_loss(hidden, weight, bias)
    if bool((targets < 0).any() | (targets >= weight.shape[0]).any()):
        raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index "
                         f"({ignore_index}); got values from {int(targets.min())} to "
                         f"{int(targets.max())}")
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    return _LinearCrossEntropy.apply(rows, weight, bias, targets, chunk_size, needs)


def _zero_loss(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A 0 loss connected to `tensors`, so each one that requires grad gets a zero gradient."""
    parts = [t.sum().float() * 0 for t in tensors if t is not None and t.requires_grad]
    return sum(parts, torch.zeros((), device=tensors[0].device))


def _check_inputs(hidden, weight, labels, bias, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, d) and weight (V, d); got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}: flatten the batch dimensions first")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must have shape ({hidden.shape[0]},) to match hidden; "
                         f"got {tuple(labels.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """transformers' causal-LM loss (`model(input_ids, labels=labels).loss`) without full logits.

    input_ids, attention_mask, labels (B, T) -> scalar fp32: the mean over supervised positions
    of CE(head(h_t), labels[t + 1]), labels = -100 marking unsupervised tokens. Only the
    supervised rows of the last hidden states reach the head. A plain nn.Linear head goes
    through `linear_cross_entropy`; any other head (e.g. one wrapped by an adapter) is applied
    chunk by chunk under activation checkpointing, so its logits are recomputed in backward.
    """
    _check_plain_logits(model)
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out[0]                                                     # (B, T, d)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)                  # (B, T): label of t + 1
    keep = shifted != -100                                              # (B, T)
    rows, targets = hidden[keep], shifted[keep]                         # (n, d), (n,)
    head = model.get_output_embeddings()
    if _is_plain_linear(head):
        return linear_cross_entropy(rows, head.weight, targets, head.bias, chunk_size)
    return _checkpointed_head_loss(head, rows, targets, chunk_size)


def _backbone(model: nn.Module) -> nn.Module:
    """The module that maps input_ids to the last hidden states (the one the head reads)."""
    body = getattr(model, "base_model", model)
    if body is model or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no separate backbone and output head; "
                         f"causal_lm_loss needs a transformers *ForCausalLM model")
    return body


def _check_plain_logits(model: nn.Module) -> None:
    """Refuse models whose forward transforms the logits after the head (we would miss it)."""
    config = getattr(model, "config", None)
    checks = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0}
    for name, neutral in checks.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise ValueError(f"{type(model).__name__} post-processes its logits "
                             f"(config.{name}={value}); causal_lm_loss does not reproduce that, "
                             f"use model(..., labels=labels).loss instead")


def _is_plain_linear(head: nn.Module) -> bool:
    """Exactly nn.Linear (not a subclass such as a quantized linear), with no hooks and no
    patched forward (accelerate's offloading hooks replace `forward` on the instance)."""
    return (type(head) is nn.Linear and not head._forward_hooks
            and not head._forward_pre_hooks and "forward" not in vars(head))


def _checkpointed_head_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor,
                            chunk_size: int) -> torch.Tensor:
    """Mean CE of head(rows) with each chunk's logits freed after forward, recomputed in
    backward. rows (n, d), targets (n,) -> scalar fp32."""
    n = rows.shape[0]
    if n == 0:
        return _zero_loss(rows, *head.parameters())
    total = 0
    for start in range(0, n, chunk_size):
        total = total + checkpoint(_chunk_loss_sum, head, rows[start:start + chunk_size],
                                   targets[start:start + chunk_size], use_reentrant=False)
    return total / n


def _chunk_loss_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()                                            # (c, V)
    return F.cross_entropy(logits, y, reduction="sum")
