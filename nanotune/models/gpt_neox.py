"""GPT-NeoX, the architecture of the Pythia family, written from scratch.

Parameter names follow Hugging Face's checkpoint layout exactly, so a Pythia folder loads with no
conversion, and what we save loads in transformers' GPTNeoXForCausalLM. Shapes: B batch, T time,
C hidden size, nh heads, hs head size (C = nh * hs), V vocabulary.
"""
from dataclasses import asdict, dataclass

import torch.nn as nn
import torch.nn.functional as F

from nanotune import UserError
from nanotune.models.base import CausalLM, positive_ints, rotate
from nanotune.models.rope import read_rope, rotary_tables


@dataclass
class Config:
    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    rope_scaling: dict = None  # {"rope_type", its parameters} (nanotune.models.rope); None: default
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict, where: str) -> "Config":
        """Read a transformers config.json dict, accepting both the old and the new rotary spelling."""
        if hf.get("hidden_act", "gelu") != "gelu":
            raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported, only 'gelu'")
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})  # transformers 4, 5 spellings
        known = {k: hf[k] for k in cls.__dataclass_fields__ if k in hf and k != "rope_scaling"}
        known["rotary_pct"] = rope.get("partial_rotary_factor",
                                       hf.get("partial_rotary_factor", hf.get("rotary_pct", cls.rotary_pct)))
        positive_ints(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size"), where)
        scaling = read_rope(hf, where, int(hf["hidden_size"] // hf["num_attention_heads"] * known["rotary_pct"]),
                            rope=rope, theta=hf.get("rope_theta", hf.get("rotary_emb_base", cls.rotary_emb_base)))
        known["rotary_emb_base"] = scaling.pop("rope_theta")
        known["rope_scaling"] = scaling if scaling["rope_type"] != "default" else None
        config = cls(**known)
        if config.hidden_size % config.num_attention_heads:
            raise UserError(f"{where}: hidden_size {config.hidden_size} is not divisible by "
                            f"num_attention_heads {config.num_attention_heads}")
        return config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self) -> dict:
        """The config.json transformers expects (both rotary spellings, so old and new versions read it)."""
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rotary_emb_base,
                "partial_rotary_factor": self.rotary_pct}
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu",
                **asdict(self), "partial_rotary_factor": self.rotary_pct, "rope_theta": self.rotary_emb_base,
                "rope_parameters": rope}


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.head_size = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, ctx):
        B, T, C = x.shape
        cos, sin = ctx.cos, ctx.sin  # each (B or 1, 1, T, r), r = hs * rotary_pct
        # The fused projection's rows are interleaved per head: [q_h0 k_h0 v_h0 q_h1 k_h1 v_h1 ...].
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv.split(self.head_size, dim=-1)  # each (B, nh, T, hs)
        # Partial rotary embeddings (GPT-NeoX paper, sec. 2.1): only the first r of each head's dims rotate.
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = ctx.attend(self, q, k, v)  # (B, nh, T, hs)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact (erf) GELU, as Pythia


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, ctx):
        attn = self.attention(self.input_layernorm(x), ctx)
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x)), Pythia's default
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """The `gpt_neox.` part of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, config: Config):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPTNeoX(CausalLM):
    config_class = Config
    blocks_path, head_path, embed_path = "gpt_neox.layers", "embed_out", "gpt_neox.embed_in"
    lora_targets = ("query_key_value",)
    # transformers 5 calls the head `lm_head` in memory (its checkpoints still say embed_out), so a
    # PEFT adapter that saves the head may use either name.
    head_aliases = {"lm_head": "embed_out"}
    ignored_keys = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")

    def __init__(self, config: Config):
        super().__init__(config)
        self.gpt_neox = Trunk(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def embed(self, input_ids):
        return self.gpt_neox.embed_in(input_ids)

    def final_norm(self, x):
        return self.gpt_neox.final_layer_norm(x)

    def rotary(self, positions, dtype):
        """cos, sin of shape (B, T, r) for positions (B, T), in fp32 like transformers, then cast."""
        config = self.config
        rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rotary_emb_base}
        return rotary_tables(rope, int(config.head_dim * config.rotary_pct), config.max_position_embeddings,
                             positions, dtype)  # pair (i, i + dim/2) shares an angle


MODEL_TYPES = {"gpt_neox": GPTNeoX}
