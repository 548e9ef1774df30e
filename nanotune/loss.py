"""The training loss: summed next-token cross-entropy, fused with the output head.

The logits of a real vocabulary are the largest tensor of a step (B*T x V: 4 x 1024 x 128k fp32 is
2 GB), so they are computed a chunk at a time, only where a label exists, and never kept for the
backward (LinearCrossEntropy below).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of a position that is not trained on (cross_entropy's ignore_index)


def summed_cross_entropy(h, labels, head, chunk=256, softcap=None):
    """Summed next-token cross-entropy over positions whose label is not IGNORE (fp32 scalar).

    h (B, T, C) are the final hidden states, head the output Linear. labels are already shifted
    (labels[:, t] is the target after input_ids[:, t]). The caller divides by the token count of the
    whole global batch, so every micro-batch, rank and accumulation step weighs each token equally.
    softcap: the logits are softcap tanh(logits / softcap) (Gemma 2's final soft-capping)."""
    keep = labels != IGNORE
    h, targets = h[keep], labels[keep]  # (N, C), (N,)
    if softcap is not None:  # each chunk's logits recomputed in the backward rather than kept (checkpoint)
        return sum((checkpoint(capped_cross_entropy, head, h[i:i + chunk], targets[i:i + chunk], softcap,
                               use_reentrant=False) for i in range(0, h.shape[0], chunk)),
                   h.new_zeros((), dtype=torch.float32))
    if type(head) is nn.Linear and head.bias is None:  # a LoRA-adapted head takes the plain loop below
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) \
            else head.weight.dtype
        return LinearCrossEntropy.apply(h.to(dtype), head.weight.to(dtype), targets, chunk, torch.is_grad_enabled())
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        logits = head(h[i:i + chunk]).float()
        total = total + F.cross_entropy(logits, targets[i:i + chunk], reduction="sum")
    return total


def capped_cross_entropy(head, h, targets, softcap):
    logits = head(h).float()
    return F.cross_entropy(torch.tanh(logits / softcap) * softcap, targets, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, target_i) with the gradients computed in the forward, `chunk` rows at a time.

    Plain autograd keeps every chunk's (n, V) logits, their fp32 copy and their log-softmax for the
    backward. Here each chunk's gradient is formed at once instead, since d loss / d logits is just
    softmax - one_hot(target): grad_h = dlogits @ W (n, C), and grad_W += dlogits^T @ h (V, C)
    when the head trains. Only grad_h (N, C) and grad_W outlive the forward, and one (chunk, V)
    buffer serves every chunk: on a CPU, a fresh 50-200 MB tensor per chunk costs more in page
    faults (the kernel zero-fills each new mapping) than the softmax itself. Same idea as
    Liger-Kernel's fused linear cross-entropy. h and W come in the compute dtype; the softmax is fp32.

    On a CPU the softmax runs on CPU_ROWS rows at a time: its passes over an (8, V) fp32 block
    (1.6 MB at V = 50k, 4 MB at 128k) stay in cache, where a whole chunk would go to DRAM on every
    pass. There each block is first copied to fp32 and then reduced and shifted in place: a CPU runs
    amax over bf16 and a bf16 - fp32 subtraction 3-4x slower than the copy and the same passes in
    fp32 (together 1.5-1.7x faster than 32 rows without the copy, with the same gradients bit for
    bit: BENCHMARKS.md). A GPU takes the chunk at once, straight from the compute dtype.

    grad_enabled: whether autograd records this call. ctx.needs_input_grad says only which inputs
    require grad, and a trained head does under torch.no_grad() too, so without it every evaluation
    batch of a full fine-tune would allocate a (V, C) fp32 weight gradient and run two more GEMMs.

    fp16 (fp16-mixed): softmax - one_hot is kept in fp32 and both gradient GEMMs run in fp32 against
    an fp32 copy of the head ((V, C) x 4 bytes more while the loss runs). In fp16, whose smallest
    value is 6e-8, most of a 128k-vocabulary softmax would round to zero, and the loss scaler cannot
    help: this gradient is formed here in the forward, before any scaling. grad_h is kept in fp32 too
    and cast to fp16 in the backward, after the loss scale has been applied."""

    CPU_ROWS = 8

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, grad_enabled=True):
        N, V = h.shape[0], weight.shape[0]
        need_h, need_w = (need and grad_enabled for need in ctx.needs_input_grad[:2])
        ctx.h_dtype, ctx.weight_dtype = h.dtype, weight.dtype
        fp32_grads = h.dtype == torch.float16 and (need_h or need_w)  # see the docstring: fp16
        w32 = weight.float() if fp32_grads else None
        cpu = h.device.type == "cpu"
        rows = LinearCrossEntropy.CPU_ROWS if cpu and not fp32_grads else chunk  # fp32_grads: probs is the chunk's
        logits = h.new_empty(min(chunk, N), V)  # compute dtype: the chunk's logits, then its dlogits
        probs = h.new_empty(min(rows, N), V, dtype=torch.float32)
        grad_h = torch.empty_like(h, dtype=torch.float32 if fp32_grads else h.dtype) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_w_chunk = torch.empty_like(weight) if need_w and weight.dtype != torch.float32 and not fp32_grads \
            else None
        total = h.new_zeros((), dtype=torch.float32)
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen here, and out= needs that
            for i in range(0, N, chunk):
                x = h[i:i + chunk]  # (n, C)
                z = torch.matmul(x, weight.t(), out=logits[:x.shape[0]])  # (n, V)
                for j in range(0, x.shape[0], rows):
                    zj = z[j:j + rows]  # (m, V)
                    t = targets[i + j:i + j + zj.shape[0], None]  # (m, 1)
                    zf = probs[:zj.shape[0]].copy_(zj) if cpu else zj  # (m, V)
                    top = zf.amax(dim=1, keepdim=True).float()  # subtracted before exp: nothing overflows
                    p = torch.sub(zf, top, out=probs[:zj.shape[0]]).exp_()  # fp32
                    s = p.sum(dim=1, keepdim=True)
                    total += (top + s.log() - zj.gather(1, t).float()).sum()  # logsumexp - target logit
                    if need_h or need_w:
                        p.div_(s).scatter_add_(1, t, p.new_full(t.shape, -1.0))  # softmax - one_hot(target)
                        if not fp32_grads:
                            zj.copy_(p)
                if fp32_grads:  # the chunk's dlogits stay in probs, fp32 (n, V)
                    if need_h:
                        torch.matmul(p, w32, out=grad_h[i:i + x.shape[0]])
                    if need_w:
                        grad_w.addmm_(p.t(), x.float())
                    continue
                if need_h:
                    torch.matmul(z, weight, out=grad_h[i:i + x.shape[0]])
                if need_w and grad_w_chunk is None:
                    grad_w.addmm_(z.t(), x)
                elif need_w:  # accumulate in fp32 over chunks, as autocast's fp32 master gradient would
                    grad_w.add_(torch.matmul(z.t(), x, out=grad_w_chunk))
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_h * grad_total.to(grad_h.dtype)).to(ctx.h_dtype) if grad_h is not None else None,
                (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)
