"""ChatGLM2/3 and GLM-4 (THUDM), in both of the layouts their checkpoints come in.

  model_type 'chatglm'  THUDM's own layout, read by their remote code (ChatGLM2-6B, ChatGLM3-6B,
                        glm-4-9b, glm-4-9b-chat): transformer.encoder.layers.N.self_attention.query_key_value
  model_type 'glm'      transformers' layout (GlmForCausalLM, glm-4-9b-chat-hf): model.layers.N.self_attn.q_proj
Both are one computation, written once below: pre-norm blocks with RMSNorm, grouped-query attention
with rotary embeddings on the first half of each head's dimensions (adjacent pairs rotating together),
and a SwiGLU MLP whose gate and up projections are one fused Linear. The two module trees only give
that math the checkpoint's names, so each folder loads with no conversion and saves back as it was.
Shapes: B batch, T time, C hidden size, nh query heads, ng key/value groups, d head size, F MLP width,
V vocabulary.
"""
from dataclasses import dataclass, field

import torch.nn as nn
import torch.nn.functional as F

from nanotune import UserError
from nanotune.models.base import CausalLM, RMSNorm, positive_ints, rotate, rotate_pairs
from nanotune.models.rope import read_rope, rotary_tables


@dataclass
class Config:
    """The computation's sizes, in transformers' names; defaults are GLM-4-9B's."""
    vocab_size: int = 151552
    hidden_size: int = 4096
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 13696
    rms_norm_eps: float = 1.5625e-07
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5  # the rotated share of each head's dimensions
    rope_scaling: dict = None  # glm only: {"rope_type", its parameters} (nanotune.models.rope); None: default
    attention_bias: bool = True  # on the q, k, v projections (THUDM's add_qkv_bias)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    # The config.json as read: to_hf writes it back with the fields above updated, so the fields
    # nanotune does not use (auto_map, which points transformers at THUDM's code, eos ids, ...) survive.
    source: dict = field(default_factory=dict)

    def check(self, where: str, groups: str, head_size: str):
        """Refuse sizes the attention cannot split; groups and head_size: the layout's names for them."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"{groups} {self.num_key_value_heads}")
        rotated = int(self.head_dim * self.partial_rotary_factor)
        if rotated < 2 or rotated % 2:
            raise UserError(f"{where}: {head_size} {self.head_dim} leaves {rotated} rotary dimensions per head; "
                            "rotary embeddings turn pairs of dimensions, so that must be even")
        return self


@dataclass
class ChatGLMConfig(Config):
    """THUDM's config.json (configuration_chatglm.py): padded_vocab_size, num_layers, kv_channels, ..."""
    multi_query_attention: bool = True  # False: query_key_value's rows go per head, [q k v] x nh
    add_bias_linear: bool = False  # biases on every Linear but the head, query_key_value's included
    post_layer_norm: bool = True  # a final RMSNorm before the head

    @classmethod
    def from_hf(cls, hf: dict, where: str) -> "ChatGLMConfig":
        """Defaults for absent fields are those of THUDM's ChatGLMConfig, as their code would read them."""
        if hf.get("pre_seq_len") is not None:
            raise UserError(f"{where}: pre_seq_len is set, so this is a P-tuning v2 checkpoint (a prefix_encoder "
                            "in front of the model), which nanotune does not load; point --model at the base model")
        if hf.get("quantization_bit"):
            raise UserError(f"{where}: quantization_bit is {hf['quantization_bit']}, one of THUDM's int4/int8 "
                            "checkpoints; nanotune quantizes the full-precision model itself (--load-in-4bit)")
        if not hf.get("rmsnorm", True):
            raise UserError(f"{where}: rmsnorm is false (LayerNorm), which nanotune does not implement; "
                            "ChatGLM2/3 and GLM-4 use RMSNorm")
        if hf.get("apply_residual_connection_post_layernorm"):
            raise UserError(f"{where}: apply_residual_connection_post_layernorm is true, which nanotune does not "
                            "implement; ChatGLM2/3 and GLM-4 add the residual before the norm")
        positive_ints(hf, ("padded_vocab_size", "num_layers", "hidden_size", "num_attention_heads",
                           "ffn_hidden_size"), where)
        heads, mqa = hf["num_attention_heads"], bool(hf.get("multi_query_attention", False))
        kv_channels = hf.get("kv_channels", 128)
        sizes = {"kv_channels": hf["hidden_size"] // heads if kv_channels is None else kv_channels,
                 "multi_query_group_num": hf.get("multi_query_group_num", 1) if mqa else heads}
        positive_ints(sizes, sizes, where)
        rope_ratio = hf.get("rope_ratio", 1)
        if isinstance(rope_ratio, bool) or not isinstance(rope_ratio, (int, float)) or rope_ratio <= 0:
            raise UserError(f"{where}: rope_ratio must be a positive number, got {rope_ratio!r}")
        return cls(vocab_size=hf["padded_vocab_size"], hidden_size=hf["hidden_size"],
                   num_hidden_layers=hf["num_layers"], num_attention_heads=heads,
                   num_key_value_heads=sizes["multi_query_group_num"], head_dim=sizes["kv_channels"],
                   intermediate_size=hf["ffn_hidden_size"], rms_norm_eps=hf.get("layernorm_epsilon", 1e-5),
                   rope_theta=10000.0 * rope_ratio,  # THUDM's RotaryEmbedding: base = 10000 * rope_ratio
                   partial_rotary_factor=0.5,  # THUDM rotates kv_channels // 2 dimensions of each head
                   attention_bias=bool(hf.get("add_qkv_bias", False)), multi_query_attention=mqa,
                   max_position_embeddings=hf.get("seq_length", 2048),
                   add_bias_linear=bool(hf.get("add_bias_linear", False)),
                   post_layer_norm=bool(hf.get("post_layer_norm", True)),
                   source=dict(hf)).check(where, "multi_query_group_num", "kv_channels")

    def to_hf(self) -> dict:
        return {"architectures": ["ChatGLMModel"], **self.source, "model_type": "chatglm",
                "padded_vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "multi_query_attention": self.multi_query_attention, "kv_channels": self.head_dim,
                # without multi-query attention THUDM's code reads no group number: leave the field as it was
                **({"multi_query_group_num": self.num_key_value_heads} if self.multi_query_attention else {}),
                "ffn_hidden_size": self.intermediate_size, "layernorm_epsilon": self.rms_norm_eps,
                "rope_ratio": self.rope_theta / 10000.0, "add_qkv_bias": self.attention_bias,
                "add_bias_linear": self.add_bias_linear, "post_layer_norm": self.post_layer_norm,
                "rmsnorm": True, "seq_length": self.max_position_embeddings}


@dataclass
class GlmConfig(Config):
    """transformers' config.json for GlmForCausalLM; defaults for absent fields are GlmConfig's."""

    @classmethod
    def from_hf(cls, hf: dict, where: str) -> "GlmConfig":
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported, only 'silu'")
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})  # transformers 4, 5 spellings
        positive_ints(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size"), where)
        head_dim = hf.get("head_dim", 128)
        sizes = {"num_key_value_heads": hf.get("num_key_value_heads", 2),
                 "head_dim": hf["hidden_size"] // hf["num_attention_heads"] if head_dim is None else head_dim}
        positive_ints(sizes, sizes, where)
        known = {k: hf[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "intermediate_size", "rms_norm_eps", "attention_bias", "tie_word_embeddings",
                                    "max_position_embeddings") if k in hf}
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", cls.partial_rotary_factor))
        scaling = read_rope(hf, where, int(sizes["head_dim"] * partial), rope=rope,
                            theta=hf.get("rope_theta") or cls.rope_theta)
        return cls(**known, **sizes, rope_theta=scaling.pop("rope_theta"), partial_rotary_factor=partial,
                   rope_scaling=scaling if scaling["rope_type"] != "default" else None,
                   source=dict(hf)).check(where, "num_key_value_heads", "head_dim")

    def to_hf(self) -> dict:
        """Both rotary spellings, so transformers 4 and 5 read it."""
        rope = {**(self.source.get("rope_parameters") or {}), "rope_type": "default", **(self.rope_scaling or {}),
                "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor}
        return {"architectures": ["GlmForCausalLM"], **self.source, "model_type": "glm", "hidden_act": "silu",
                **{k: getattr(self, k) for k in Config.__dataclass_fields__ if k not in ("source", "rope_scaling")},
                "rope_parameters": rope}  # (a rope_scaling the folder had stays, in source)


def swiglu(x):
    """(..., 2F) -> (..., F): silu(gate) * up, the gate being the fused projection's first half
    (Shazeer 2020, 'GLU Variants Improve Transformer')."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention(module, q, k, v, ctx, config: Config):
    """Causal grouped-query attention. q (B, T, nh*d); k, v (B, T, ng*d) -> (B, T, nh*d).
    Query heads share key/value heads in consecutive runs (GLM-4-9B: nh = 32, ng = 2):
        q0 ... q15 | q16 ... q31
            k0     |     k1
    """
    B, T, _ = q.shape
    nh, ng, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = q.view(B, T, nh, d).transpose(1, 2)  # (B, nh, T, d)
    k = k.view(B, T, ng, d).transpose(1, 2)  # (B, ng, T, d)
    v = v.view(B, T, ng, d).transpose(1, 2)
    cos, sin = ctx.cos, ctx.sin  # each (B or 1, 1, T, r): only the first r = d/2 dimensions rotate
    q, k = rotate(q, cos, sin, rotate_pairs), rotate(k, cos, sin, rotate_pairs)
    # THUDM's query-key layer scaling divides the scores by the layer number and multiplies them back
    # in fp32: the plain 1/sqrt(d) here, up to rounding.
    y = ctx.attend(module, q, k, v)  # (B, nh, T, d)
    return y.transpose(1, 2).reshape(B, T, nh * d)


class SelfAttention(nn.Module):
    """THUDM's attention: one fused query_key_value Linear (C -> (nh + 2 ng) d), then dense."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.config = config
        nh, ng, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, (nh + 2 * ng) * d,
                                         bias=config.attention_bias or config.add_bias_linear)
        self.dense = nn.Linear(nh * d, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        nh, ng, d = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        qkv = self.query_key_value(x)
        if self.config.multi_query_attention:  # rows in blocks: [q: nh*d | k: ng*d | v: ng*d]
            q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
        else:  # rows per head: [q0 k0 v0 | q1 k1 v1 | ...], each d wide
            q, k, v = (t.reshape(B, T, nh * d) for t in qkv.view(B, T, nh, 3 * d).split(d, dim=-1))
        return self.dense(attention(self, q, k, v, ctx, self.config))


class MLP(nn.Module):
    """THUDM's SwiGLU MLP: dense_h_to_4h (C -> 2F, gate rows first), dense_4h_to_h (F -> C)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        bias = config.add_bias_linear
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.dense_4h_to_h(swiglu(self.dense_h_to_4h(x)))


class GlmAttention(nn.Module):
    """transformers' attention: q_proj, k_proj, v_proj (the fused rows above, in three), o_proj."""

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.config = config
        nh, ng, d, C = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.q_proj = nn.Linear(C, nh * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, ng * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, ng * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(nh * d, C, bias=False)

    def forward(self, x, ctx):
        return self.o_proj(attention(self, self.q_proj(x), self.k_proj(x), self.v_proj(x), ctx, self.config))


class GlmMLP(nn.Module):
    """transformers' SwiGLU MLP: gate_up_proj (C -> 2F, gate rows first), down_proj (F -> C)."""

    def __init__(self, config: GlmConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). The layouts name the attention differently
    (`self_attention` in THUDM's, `self_attn` in transformers'), so it is registered under the given name."""

    def __init__(self, config: Config, attention_name: str, attention_module: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention_name = attention_name
        self.add_module(attention_name, attention_module)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, ctx):
        x = x + getattr(self, self.attention_name)(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class GLMFamily(CausalLM):
    """What both layouts share: the rotary angles."""

    def rotary(self, positions, dtype):
        """cos, sin of shape (B, T, r) for positions (B, T), r = head_dim * partial_rotary_factor, in fp32
        like THUDM's and transformers' code, then cast. Pair (2i, 2i+1) turns by position * theta^(-2i/r)."""
        config = self.config
        rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}  # glm only
        return rotary_tables(rope, int(config.head_dim * config.partial_rotary_factor), config.max_position_embeddings,
                             positions, dtype, interleaved=True)  # (B, T, r): (a0 a0 a1 a1 ...), for rotate_pairs


class ChatGLM(GLMFamily):
    """THUDM's module tree (modeling_chatglm.py). The plain nn.Module()s are namespaces that give the
    parameters their checkpoint names; the forward is CausalLM's."""
    config_class = ChatGLMConfig
    blocks_path, head_path = "transformer.encoder.layers", "transformer.output_layer"
    lora_targets = ("query_key_value",)
    embed_path = "transformer.embedding.word_embeddings"
    ignored_keys = ("rotary_pos_emb.inv_freq",)

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        C, V = config.hidden_size, config.vocab_size
        self.transformer = nn.Module()
        self.transformer.embedding = nn.Module()
        self.transformer.embedding.word_embeddings = nn.Embedding(V, C)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(
            Block(config, "self_attention", SelfAttention(config), MLP(config))
            for _ in range(config.num_hidden_layers))
        if config.post_layer_norm:
            self.transformer.encoder.final_layernorm = RMSNorm(C, config.rms_norm_eps)
        self.transformer.output_layer = nn.Linear(C, V, bias=False)
        self.tie_weights()

    def embed(self, input_ids):
        return self.transformer.embedding.word_embeddings(input_ids)

    def final_norm(self, x):
        return self.transformer.encoder.final_layernorm(x) if self.config.post_layer_norm else x


class Glm(GLMFamily):
    """transformers' module tree (GlmForCausalLM)."""
    config_class = GlmConfig
    blocks_path, head_path, embed_path = "model.layers", "lm_head", "model.embed_tokens"
    lora_targets = ("q_proj", "v_proj")
    ignored_keys = ("rotary_emb.inv_freq",)

    def __init__(self, config: GlmConfig):
        super().__init__(config)
        C, V = config.hidden_size, config.vocab_size
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, C)
        self.model.layers = nn.ModuleList(Block(config, "self_attn", GlmAttention(config), GlmMLP(config))
                                          for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(C, config.rms_norm_eps)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.tie_weights()

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def final_norm(self, x):
        return self.model.norm(x)


MODEL_TYPES = {"chatglm": ChatGLM, "glm": Glm}
