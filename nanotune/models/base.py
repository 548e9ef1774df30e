"""What every model family shares: the surface the rest of nanotune reads, the block loop, the loss,
and the small pieces several families use (RMSNorm, rotary embeddings).

The rest of the library never names a family's modules. It reads them from the model:
  model.blocks        the nn.ModuleList of transformer blocks (FSDP's units, gradient checkpointing)
  model.blocks_path   where that list lives in the checkpoint ('model.layers', 'gpt_neox.layers', ...)
  model.head          the output Linear (C -> V); model.head_path its checkpoint name, which
                      quantization and 'all-linear' LoRA leave alone, as PEFT and QLoRA do
  model.head_aliases  other names the head has in transformers or PEFT ({'lm_head': 'embed_out'})
  model.lora_targets  the Linears LoRA adapts by default: PEFT's default for the family
A family provides embed(input_ids), rotary(positions, dtype) -> (cos, sin) and final_norm(x); blocks
are called as block(x, ctx), and each attention layer hands its rotated q, k, v to ctx.attend (below),
which knows what the family need not: which keys each query may see, and the generation cache.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanotune import UserError
from nanotune.loss import summed_cross_entropy


class CausalLM(nn.Module):
    blocks_path: str
    head_path: str
    embed_path: str  # the input embedding, which tie_word_embeddings shares with the head
    head_aliases: dict = {}
    lora_targets: tuple
    ignored_keys: tuple = ()  # checkpoint tensors recomputed here (masks, rotary frequencies)

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

    def hidden_states(self, input_ids, positions=None, documents=None, cache=None):
        """(B, T) token ids -> (B, T, C) final-norm hidden states. Right padding needs no mask: causal
        attention never lets a real token see the pads that follow it. positions (B, T): each token's
        position (None: 0..T-1); documents and cache: see Context."""
        x = self.embed(input_ids)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        cos, sin = self.rotary(positions, dtype)  # (B or 1, T, r) each
        ctx = Context(cos[:, None], sin[:, None], documents, cache)  # (B or 1, 1, T, r): broadcast over heads
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                # Keep only the block's input for the backward, which runs the block's forward again
                # to rebuild its activations: memory for one block instead of all, at ~1/3 more compute.
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.final_norm(x)

    def forward(self, input_ids, labels=None):
        """Logits (B, T, V); or, given labels, the summed loss (nanotune.loss). Training goes through
        forward, not the loss directly, because DDP and FSDP hook the wrapped module's forward."""
        if labels is not None:
            return summed_cross_entropy(self.hidden_states(input_ids), labels, self.head)
        return self.head(self.hidden_states(input_ids))


@dataclass
class Context:
    """What every attention layer of one forward shares: the rotary tables of its tokens' positions,
    and how to attend.

    cos, sin   (B or 1, 1, T, r): a head's q and k (B, nh, T, hs) rotate by them (the family knows how)
    documents  (B, T) ids or None: packed rows, a query sees only keys of its own document
    cache      {attention module: (k, v)} or None: generation, k and v of the positions before these"""
    cos: torch.Tensor
    sin: torch.Tensor
    documents: torch.Tensor = None
    cache: dict = None

    def attend(self, module, q, k, v, window=None):
        """Causal attention of q (B, nh, Tq, hs) over k, v (B, nkv, Tk, hs) -> (B, nh, Tq, hs). With a
        cache, module's earlier k, v come first and these are appended. window: a key at distance >=
        window from its query is not seen (Mistral's sliding window)."""
        if self.cache is not None:
            if module in self.cache:
                k, v = (torch.cat((old, new), dim=2) for old, new in zip(self.cache[module], (k, v)))
            self.cache[module] = (k, v)
        Tq, Tk = q.shape[2], k.shape[2]
        gqa = k.shape[1] != q.shape[1]
        if self.documents is None and (window is None or Tk <= window):
            if Tq == Tk:  # the training case: plain causal attention, GQA without copying k, v
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            if Tq == 1:  # one new token sees every cached key
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # the queries' positions among the keys
        j = torch.arange(Tk, device=q.device)[None, :]
        mask = (j <= i) & ((i - j < window) if window is not None else True)  # (Tq, Tk)
        if self.documents is not None:  # (B, 1, T, T): and within the same packed row
            mask = mask & (self.documents[:, None, :, None] == self.documents[:, None, None, :])
        if gqa:  # with a mask, CUDA runs GQA only in its slow math kernel: copy k, v per query head
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


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


def rotate_pairs(x):
    """Rotary embedding, the interleaved layout (GPT-J, ChatGLM, GLM-4): dimension 2i pairs with 2i + 1,
    so cos and sin repeat each angle twice in a row: (a0 a0 a1 a1 ...)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def inv_frequencies(dim, base, device):
    """base^(-2i/dim) for i < dim/2: the angle per position of each rotated pair (RoFormer, sec. 3.4)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))


def positive_ints(hf: dict, keys, where: str):
    """Refuse a config.json whose sizes are missing or not positive integers."""
    for key in keys:
        if key not in hf:
            raise UserError(f"{where}: the required field {key!r} is missing")
        if type(hf[key]) is not int or hf[key] < 1:
            raise UserError(f"{where}: {key} must be a positive integer, got {hf[key]!r}")
