"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (model_type 'phi3'): Llama's computation (nanotune.models.llama)
with its projections fused, in the checkpoint's own layout:

  model.layers.N.self_attn.qkv_proj   C -> (nh + 2 nkv) hs: the rows of q, then k, then v
  model.layers.N.mlp.gate_up_proj     C -> 2 F: the gate's rows, then up's; silu(gate) * up

so adapters PEFT trains on Phi-3 fit as they are. Phi-4-mini rotates only the
first partial_rotary_factor of each head's dimensions; the long-context folders (Phi-3-128k, Phi-3.5,
Phi-4-mini) carry longrope scaling (nanotune.models.rope).
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from nanotune import UserError
from nanotune.models import llama
from nanotune.models.base import rotate


@dataclass
class Config(llama.Config):
    model_type: str = "phi3"
    partial_rotary_factor: float = 1.0  # the rotated share of each head's dimensions (0.75 in Phi-4-mini)
    original_max_position_embeddings: int = 4096  # the pretraining context, where longrope switches factors

    @classmethod
    def from_hf(cls, hf: dict, where: str) -> "Config":
        config = super().from_hf(hf, where)
        rotated = int(config.head_dim * config.partial_rotary_factor)
        if not 0 < config.partial_rotary_factor <= 1 or rotated % 2:
            raise UserError(f"{where}: partial_rotary_factor {config.partial_rotary_factor} leaves {rotated} of "
                            f"head_dim {config.head_dim} to rotate, which must be an even number above 0")
        return config

    def architecture(self) -> str:
        return "Phi3ForCausalLM"

    def to_hf(self) -> dict:
        hf = super().to_hf()
        hf["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
        return hf


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.qkv_proj = nn.Linear(config.hidden_size, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                          self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rotate(q, ctx.cos, ctx.sin), rotate(k, ctx.cos, ctx.sin)  # the first r dims of each head
        y = ctx.attend(self, q, k, v, window=self.sliding_window)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down_proj(up * F.silu(gate))  # SwiGLU, as Llama's


class Phi3(llama.Llama):
    config_class = Config
    # PEFT has no default for phi3 (it asks for target_modules); its default for the other fused layouts
    # (codegen's qkv_proj, GPT-NeoX's query_key_value) is the fused q, k, v projection, and so is ours.
    lora_targets = ("qkv_proj",)
    attention_class, mlp_class = Attention, MLP

    def __init__(self, config: Config):
        super().__init__(config)
        # transformers' Phi-3 generation drops its cache once a sequence grows past the original context,
        # and recomputes it whole: with longrope, every position then turns by the long factors.
        long = (config.rope_scaling or {}).get("rope_type") == "longrope"
        self.recompute_past = config.original_max_position_embeddings if long else None


MODEL_TYPES = {"phi3": Phi3}
