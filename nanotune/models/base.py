"""What every model family shares: the surface the rest of nanotune reads, the block loop, the loss,
and the small pieces several families use (RMSNorm, rotary embeddings).

The rest of the library never names a family's modules. It reads them from the model:
  model.blocks        the nn.ModuleList of transformer blocks (FSDP's units, gradient checkpointing)
  model.blocks_path   where that list lives in the checkpoint ('model.layers', 'gpt_neox.layers', ...)
  model.head          the output Linear (C -> V); model.head_path its checkpoint name, which
                      quantization and 'all-linear' LoRA leave alone, as PEFT and QLoRA do
  model.head_aliases  other names the head has in transformers or PEFT ({'lm_head': 'embed_out'})
  model.lora_targets  the Linears LoRA adapts by default: PEFT's default for the family
A family provides embed(input_ids), rotary(positions, dtype) -> (cos, sin) and final_norm(x) (and,
where its local-attention layers rotate by their own base, local_rotary: Gemma 3); blocks are called
as block(x, ctx), and each attention layer hands its rotated q, k, v to ctx.attend (below), which
knows what the family need not: which keys each query may see, and the generation cache.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanotune import UserError
from nanotune.loss import summed_cross_entropy, token_logprobs


class CausalLM(nn.Module):
    blocks_path: str
    head_path: str
    embed_path: str  # the input embedding, which tie_word_embeddings shares with the head
    head_aliases: dict = {}
    lora_targets: tuple
    ignored_keys: tuple = ()  # checkpoint tensors recomputed here (masks, rotary frequencies)
    final_logit_softcapping: float = None  # logits = c tanh(logits / c) (Gemma 2), in the loss too

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grad_checkpoint = False  # train.py --grad-checkpoint; see hidden_states

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.blocks_path)

    @property
    def head(self) -> nn.Module:
        return self.get_submodule(self.head_path)

    def tie_weights(self):
        """tie_word_embeddings: the head and the input embedding are one (V, C) tensor."""
        if self.config.tie_word_embeddings:
            self.head.weight = self.get_submodule(self.embed_path).weight

    def hidden_states(self, input_ids, positions=None, row_lengths=None, cache=None):
        """(B, T) token ids -> (B, T, C) final-norm hidden states. Right padding needs no mask: causal
        attention never lets a real token see the pads that follow it. positions (B, T): each token's
        position (None: 0..T-1); row_lengths and cache: see Context."""
        x = self.embed(input_ids)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        cos, sin = self.rotary(positions, dtype)  # (B or 1, T, r) each
        local = [t[:, None] for t in self.local_rotary(positions, dtype)] if hasattr(self, "local_rotary") else None
        ctx = Context(cos[:, None], sin[:, None], row_lengths, cache, local)  # (B or 1, 1, T, r): broadcast over heads
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                # Keep only the block's input for the backward, which runs the block's forward again
                # to rebuild its activations: memory for one block instead of all, at ~1/3 more compute.
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.final_norm(x)

    def forward(self, input_ids, labels=None, positions=None, row_lengths=None, cache=None, logprobs=False):
        """Logits (B, T, V); or, given labels, the summed loss (nanotune.loss), or with logprobs=True each
        label's log-probability (B, T) (nanotune.objectives). Training goes through
        forward, not the loss directly, because DDP and FSDP hook the wrapped module's forward.
        Packed rows (nanotune.packing) come with positions (B, T) and row_lengths (R,). Generation
        (nanotune.generate) passes a Cache and gets the last position's logits only, (B, V)."""
        h = self.hidden_states(input_ids, positions, row_lengths, cache)
        cap = self.final_logit_softcapping
        if labels is not None:
            return (token_logprobs if logprobs else summed_cross_entropy)(h, labels, self.head, softcap=cap)
        if cache is None:
            return softcap(self.head(h), cap)
        h = h[:, -1]  # (B, C): the next token's logits only. A plain head computes them transposed, W h^T:
        if type(self.head) is nn.Linear and self.head.bias is None:  # with a few rows and a large vocabulary,
            return softcap((self.head.weight @ h.T).T, cap)  # MKL runs that ~1.5x faster than h W^T
        return softcap(self.head(h), cap)  # (bench/generate.py)


@dataclass
class Context:
    """What every attention layer of one forward shares: the rotary tables of its tokens' positions,
    and how to attend.

    cos, sin     (B or 1, 1, T, r): a head's q and k (B, nh, T, hs) rotate by them (the family knows how)
    row_lengths  (R,) ints or None: packed rows (nanotune.packing), a query sees only keys of its own row.
                 The lengths of the rows of the B sequences one after another (a sequence's padding is
                 one more row), summing to B * T; the collate computes them on the host, once per batch
    cache        a Cache or None: generation, the keys and values of the positions before these
    local        (cos, sin) of the local-attention layers, where they rotate by their own base (Gemma 3)"""
    cos: torch.Tensor
    sin: torch.Tensor
    row_lengths: torch.Tensor = None
    cache: "Cache" = None
    local: tuple = None
    masks: dict = field(default_factory=dict)  # packed rows on a GPU: (window, dtype) -> block-diagonal mask

    def attend(self, module, q, k, v, window=None, scale=None, cap=None):
        """Causal attention of q (B, nh, Tq, hs) over k, v (B, nkv, Tk, hs) -> (B, nh, Tq, hs). With a
        cache, module's earlier k, v come first and these are appended. window: a key at distance >=
        window from its query is not seen (Mistral's sliding window, Gemma's local layers). scale: of
        q k^T (None: 1 / sqrt(hs)); cap: attention-logit soft-capping, c tanh(s / c) (Gemma 2)."""
        if self.cache is not None:
            k, v = self.cache.update(module, k, v)
        if self.row_lengths is None:
            return causal(q, k, v, window, self.cache.real if self.cache is not None else None, scale, cap)
        return self.packed(q, k, v, window, scale, cap)

    @torch.compiler.disable  # under --compile, eager: the rows' lengths change every step (nanotune.compile)
    def packed(self, q, k, v, window, scale=None, cap=None):
        # Packed rows, two ways, both exact. On a CPU, each row's own causal attention over contiguous
        # copies of its q, k, v: at 1024 positions of Alpaca rows 2.2-2.8x faster than one masked call
        # (BENCHMARKS.md), as it skips the blocks between rows and keeps SDPA's fused causal kernel (GQA
        # included). On a GPU a Python loop of R small calls per layer would leave it idle between
        # launches (and the lengths would have to reach the host), so there it is one SDPA call with
        # the block-diagonal mask, built once per forward on the device.
        if q.device.type != "cpu":
            return self.masked(q, k, v, window, scale, cap)
        return self.per_row(q, k, v, window, scale, cap)

    def per_row(self, q, k, v, window, scale=None, cap=None):
        """Packed rows' attention as a causal call per row (the CPU's way). One split of the (B*T)
        positions: slicing each row out of q, k, v would cost a zero-filled full-size gradient per row
        in the backward."""
        B, T = q.shape[0], q.shape[2]
        rows = zip(*(x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3]).split(self.row_lengths.tolist())
                     for x in (q, k, v)))  # per row: its (L, nh or nkv, hs) slices of q, k, v
        y = [causal(*(x.transpose(0, 1)[None].contiguous() for x in row), window, None, scale, cap)[0].transpose(0, 1)
             for row in rows]
        return torch.cat(y).view(B, T, q.shape[1], q.shape[3]).transpose(1, 2)

    def masked(self, q, k, v, window, scale=None, cap=None):
        """Packed rows' attention as one SDPA call with the block-diagonal mask (the GPU's way)."""
        if cap is not None:  # soft-capped logits (Gemma 2): SDPA has none, so written out as in causal
            return capped(q, k, v, self.block_diagonal(q, window) == 0, scale, cap)
        if q.shape[1] != k.shape[1]:  # with a mask, CUDA runs GQA only in its slow math kernel (see causal)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.block_diagonal(q, window), scale=scale)

    def block_diagonal(self, q, window):
        """(B, 1, T, T) additive mask in q's dtype: 0 where query i may see key j (one row, j <= i, within
        the window), -inf elsewhere. Built from row_lengths on the device without a copy to the host
        (output_size tells repeat_interleave the total), once per forward for each window; B * T * T
        elements (8 x 4096 positions: 134M, 268 MB in bf16)."""
        if (window, q.dtype) not in self.masks:
            B, T = q.shape[0], q.shape[2]
            rows = torch.arange(len(self.row_lengths), device=q.device)
            row = rows.repeat_interleave(self.row_lengths.to(q.device), output_size=B * T).view(B, T)  # row id
            i = torch.arange(T, device=q.device)[:, None]
            j = torch.arange(T, device=q.device)[None, :]
            seen = (row[:, :, None] == row[:, None, :]) & (j <= i) & ((i - j < window) if window is not None else True)
            self.masks[window, q.dtype] = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~seen, -float("inf"))[:, None]
        return self.masks[window, q.dtype]


def causal(q, k, v, window=None, real=None, scale=None, cap=None):
    """Causal attention of q (B, nh, Tq, hs) over k, v (B, nkv, Tk, hs): the queries are the last Tq keys.
    real (B, Tk) bool or None: which keys are tokens, not left padding (Cache.real). scale, cap: as
    Context.attend's."""
    B, nh, Tq, hs = q.shape
    Tk, nkv = k.shape[2], k.shape[1]
    if cap is not None:  # SDPA has no soft-capping: the attention written out
        return capped(q, k, v, visible(Tq, Tk, window, real, q.device), scale, cap)
    if Tq == 1:  # generation's step: each row's new token sees every cached key (that is real, within the window)
        mask = None if real is None else real[:, None, None, :]  # (B, 1, 1, Tk)
        if window is not None and Tk > window:
            recent = torch.arange(Tk, device=q.device)[None] >= Tk - window  # (1, Tk)
            mask = recent if mask is None else mask & recent
        # GQA with no copies of k, v: each k/v head's nh / nkv query heads as one block of queries.
        y = F.scaled_dot_product_attention(q.reshape(B, nkv, nh // nkv, hs), k, v, attn_mask=mask, scale=scale)
        return y.reshape(B, nh, 1, hs)
    gqa = nkv != nh
    if real is None and (window is None or Tk <= window) and Tq == Tk:
        # the training case: plain causal attention, GQA without copying k, v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    if gqa:  # with a mask, CUDA runs GQA only in its slow math kernel: copy k, v per query head
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(Tq, Tk, window, real, q.device), scale=scale)


def visible(Tq, Tk, window, real, device):
    """Which keys each query sees, (Tq, Tk) or (B, 1, Tq, Tk) bool: the queries are the last Tq of the Tk
    positions; no key after its query, none at distance >= window, none that is padding (real)."""
    i = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # the queries' positions among the keys
    j = torch.arange(Tk, device=device)[None, :]
    mask = (j <= i) & ((i - j < window) if window is not None else True)  # (Tq, Tk)
    if real is not None:  # (B, 1, Tq, Tk): no key that is padding; a pad query sees itself (no empty softmax row)
        mask = mask & (real[:, None, None, :] | (i == j))
    return mask


def capped(q, k, v, mask, scale, cap):
    """Attention with its logits soft-capped, c tanh(q k^T scale / c), before the mask (Gemma 2, as
    transformers' eager attention): q (B, nh, Tq, hs), k, v (B, nkv, Tk, hs), mask (.., Tq, Tk) bool."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, nh, Tk, hs)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = softcap(q @ k.transpose(-2, -1) * (scale or q.shape[-1] ** -0.5), cap)  # (B, nh, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def softcap(x, cap):
    """cap tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2); x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Cache:
    """Generation's memory (nanotune.generate): per attention layer, the keys and values of every position
    so far, (B, nkv, Tk, hs) each, in buffers of `size` positions allocated on the first call (so a step
    writes its new column instead of copying the whole cache); and real (B, Tk) bool, which positions are
    tokens rather than left padding (None: all are), which the generator extends before each forward.
    A plain class, not a dict: DDP and FSDP rebuild the dicts they find in a forward's arguments."""

    def __init__(self, size, real=None):
        self.size, self.real, self.kv = size, real, {}

    def update(self, module, k, v):
        """Append module's new k, v (B, nkv, T, hs); return those of every position so far."""
        if module not in self.kv:
            B, nkv, _, hs = k.shape
            self.kv[module] = (k.new_empty(B, nkv, self.size, hs), v.new_empty(B, nkv, self.size, hs), 0)
        keys, values, n = self.kv[module]
        end = n + k.shape[2]
        keys[:, :, n:end], values[:, :, n:end] = k, v
        self.kv[module] = (keys, values, end)
        return keys[:, :, :end], values[:, :, :end]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back (Zhang & Sennrich 2019), as Llama's."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    """Rotary embedding, the 'rotate half' layout (GPT-NeoX, Llama): dimension i pairs with i + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x, cos, sin, layout=None):
    """x (B, n, T, hs) rotated by cos, sin (.., T, r) in the rotate-half layout (layout=rotate_pairs: the
    interleaved one); with r < hs (partial rotary: GPT-NeoX, GLM, Phi-4-mini) only the first r dimensions
    of each head turn and the rest pass through."""
    r, layout = cos.shape[-1], layout or rotate_half
    if r == x.shape[-1]:
        return x * cos + layout(x) * sin
    return torch.cat((x[..., :r] * cos + layout(x[..., :r]) * sin, x[..., r:]), dim=-1)


def rotate_pairs(x):
    """Rotary embedding, the interleaved layout (GPT-J, ChatGLM, GLM-4): dimension 2i pairs with 2i + 1,
    so cos and sin repeat each angle twice in a row: (a0 a0 a1 a1 ...)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def positive_ints(hf: dict, keys, where: str):
    """Refuse a config.json whose sizes are missing or not positive integers."""
    for key in keys:
        if key not in hf:
            raise UserError(f"{where}: the required field {key!r} is missing")
        if type(hf[key]) is not int or hf[key] < 1:
            raise UserError(f"{where}: {key} must be a positive integer, got {hf[key]!r}")
