"""Gemma 2 (model_type 'gemma2') and Gemma 3's language model ('gemma3_text'): one architecture with a
few switches, in the checkpoint's own layout (model.layers.N.self_attn.q_proj, ...), so PEFT adapters
fit as they are and what we save loads in Gemma2ForCausalLM / Gemma3ForCausalLM. Against Llama:

  - the embedding is scaled by sqrt(C), in the weights' dtype, before the first block
  - RMSNorm multiplies by (1 + weight), in fp32 (a zero weight is the identity)
  - GeGLU: gelu (tanh approximation) where Llama has silu
  - four norms per block: before and after attention, before and after the MLP (Gemma 2, sec. 2)
  - attention scores scaled by query_pre_attn_scalar^-1/2 rather than hs^-1/2
  - layers alternate local attention (a sliding window) and global attention, per config.layer_types:
    every other layer in Gemma 2, five local to one global in Gemma 3, where the local layers also
    rotate by their own base (rope_local_base_freq, 10k) and the global ones by rope_theta (1M), scaled
  - Gemma 2 soft-caps the attention scores (c tanh(s / c), c = 50) and the final logits (c = 30);
    Gemma 3 normalises each head's query and key instead (q_norm, k_norm), as Qwen3 does
Shapes: B batch, T time, C hidden size, nh query heads, nkv key/value heads, hs head size, V vocabulary.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotune import UserError
from nanotune.models.base import CausalLM, positive_ints, rotate
from nanotune.models.rope import read_rope, rotary_tables

ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LOCAL, GLOBAL = "sliding_attention", "full_attention"  # transformers' layer types


@dataclass
class Config:
    """Gemma 2 2B's sizes; from_hf fills the rest as Gemma2Config / Gemma3TextConfig would."""
    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope: dict = None  # the global layers' rotary settings (nanotune.models.rope), theta included
    local_rope: dict = None  # gemma3_text: the local layers' own; None: the same as the global ones
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096  # a local layer's query sees the last sliding_window keys, itself included
    layer_types: list = None  # LOCAL or GLOBAL, one per layer
    attn_logit_softcapping: float = None
    final_logit_softcapping: float = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 1  # an int or a list (the instruct models also end on <end_of_turn>)
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict, where: str) -> "Config":
        model_type = hf["model_type"]
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"  # transformers reads no hidden_act here
        if act != "gelu_pytorch_tanh":
            raise UserError(f"{where}: hidden_activation {act!r} is not supported, only 'gelu_pytorch_tanh'")
        if hf.get("use_bidirectional_attention"):
            raise UserError(f"{where}: use_bidirectional_attention is true (an embedding model such as "
                            "EmbeddingGemma), which nanotune does not implement; it fine-tunes causal language models")
        positive_ints(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads"), where)
        positive_ints(hf, [k for k in ("num_key_value_heads", "head_dim", "sliding_window") if hf.get(k) is not None],
                      where)
        known = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                    "max_position_embeddings", "query_pre_attn_scalar", "sliding_window",
                                    "attention_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                    "pad_token_id", "final_logit_softcapping") if k in hf}
        if model_type == "gemma2":  # Gemma2Config's defaults: both soft-cappings on
            known.setdefault("final_logit_softcapping", 30.0)
            known["attn_logit_softcapping"] = hf.get("attn_logit_softcapping", 50.0)
        else:  # Gemma3TextConfig's: no soft-capping, and its attention ignores attn_logit_softcapping
            known.setdefault("max_position_embeddings", 131072)
        config = cls(model_type=model_type, **known)
        if config.num_attention_heads % config.num_key_value_heads:
            raise UserError(f"{where}: num_attention_heads {config.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {config.num_key_value_heads}")
        if config.head_dim % 2:
            raise UserError(f"{where}: head_dim {config.head_dim} must be even, since rotary embeddings rotate pairs")
        pattern = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)  # every pattern-th is global
        config.layer_types = hf.get("layer_types") or [LOCAL if (i + 1) % pattern else GLOBAL
                                                       for i in range(config.num_hidden_layers)]
        if len(config.layer_types) != config.num_hidden_layers or set(config.layer_types) - {LOCAL, GLOBAL}:
            raise UserError(f"{where}: layer_types must name {LOCAL!r} or {GLOBAL!r} for each of the "
                            f"{config.num_hidden_layers} layers, got {config.layer_types!r}")
        rope = hf.get("rope_parameters") or {}
        if model_type == "gemma2":
            config.rope = read_rope(hf, where, config.head_dim, theta=hf.get("rope_theta") or 10000.0)
        else:  # transformers 5 nests one dict per layer type; 4 had rope_scaling for the global layers only
            nested = GLOBAL in rope or LOCAL in rope
            config.rope = read_rope(hf, where, config.head_dim, rope=rope.get(GLOBAL) if nested else
                                    hf.get("rope_scaling") or rope, theta=hf.get("rope_theta") or 1e6)
            config.local_rope = read_rope(hf, where, config.head_dim, rope=rope.get(LOCAL) if nested else {},
                                          theta=hf.get("rope_local_base_freq") or 10000.0)
        return config

    def to_hf(self) -> dict:
        """The config.json transformers 5 reads (and 4: rope_theta, rope_local_base_freq, rope_scaling)."""
        hf = {"architectures": [ARCHITECTURES[self.model_type]], "hidden_activation": "gelu_pytorch_tanh",
              **{k: v for k, v in asdict(self).items() if k not in ("rope", "local_rope")},
              "layer_types": self.layer_types[:self.num_hidden_layers], "rope_theta": self.rope["rope_theta"]}
        if self.rope["rope_type"] != "default":
            hf["rope_scaling"] = {k: v for k, v in self.rope.items() if k != "rope_theta"}
        if self.model_type == "gemma2":
            return {**hf, "rope_parameters": dict(self.rope)}
        return {**hf, "rope_local_base_freq": self.local_rope["rope_theta"],
                "rope_parameters": {GLOBAL: dict(self.rope), LOCAL: dict(self.local_rope)}}


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in fp32, then cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Config, layer_type: str):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.local = layer_type == LOCAL
        self.sliding_window = config.sliding_window if self.local else None
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.cap = config.attn_logit_softcapping
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)
        self.qk_norm = config.model_type == "gemma3_text"
        if self.qk_norm:  # over each head's hs, before the rotation
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs) x2
        cos, sin = ctx.local if self.local and ctx.local is not None else (ctx.cos, ctx.sin)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = ctx.attend(self, q, k, v, window=self.sliding_window, scale=self.scale, cap=self.cap)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))  # GeGLU


class Block(nn.Module):
    def __init__(self, config: Config, layer_type: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, ctx):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Trunk(nn.Module):
    """The `model.` part of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, config.layer_types[i]) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma(CausalLM):
    config_class = Config
    blocks_path, head_path, embed_path = "model.layers", "lm_head", "model.embed_tokens"
    lora_targets = ("q_proj", "v_proj")  # PEFT's default for gemma2 and gemma3_text

    def __init__(self, config: Config):
        super().__init__(config)
        self.model = Trunk(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.final_logit_softcapping = config.final_logit_softcapping
        self.tie_weights()

    def embed(self, input_ids):
        x = self.model.embed_tokens(input_ids)  # (B, T, C), times sqrt(C) rounded to the weights' dtype
        return x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(x.dtype)

    def final_norm(self, x):
        return self.model.norm(x)

    def rotary(self, positions, dtype):
        """The global layers' cos, sin (B or 1, T, hs) (every layer's in Gemma 2)."""
        return rotary_tables(self.config.rope, self.config.head_dim, self.config.max_position_embeddings,
                             positions, dtype)


class Gemma3(Gemma):
    def local_rotary(self, positions, dtype):
        """The local layers' cos, sin, by their own base (rope_local_base_freq)."""
        return rotary_tables(self.config.local_rope, self.config.head_dim, self.config.max_position_embeddings,
                             positions, dtype)


MODEL_TYPES = {"gemma2": Gemma, "gemma3_text": Gemma3}
