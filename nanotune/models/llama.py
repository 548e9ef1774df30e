"""The Llama family: Llama 1-3, Mistral, Qwen2 and Qwen3, one architecture with a few switches.

Each config.json model_type keeps its own Hugging Face checkpoint layout (`model.layers.N.self_attn.q_proj`,
...), so a checkpoint loads with no conversion, PEFT adapters fit as they are, and what we save loads in
transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM. Shapes: B batch,
T time, C hidden size, nh query heads, nkv key/value heads, hs head size (not always C / nh), V vocabulary.
"""
from dataclasses import asdict, dataclass

import torch.nn as nn
import torch.nn.functional as F

from nanotune import UserError
from nanotune.models.base import CausalLM, RMSNorm, positive_ints, rotate
from nanotune.models.rope import REQUIRED as ROPE_TYPES, read_rope, rotary_tables

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


@dataclass
class Config:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    # Grouped-query attention (Ainslie et al. 2023): query heads share key/value heads in groups of
    # nh / nkv, which shrinks the k/v projections (and a KV cache) by that factor. With 4 query heads:
    #   MHA (nkv = nh = 4)   GQA (nkv = 2)        MQA (nkv = 1)
    #   v   v   v   v          v       v                v
    #   k   k   k   k          k       k                k
    #   |   |   |   |         / \     / \          /---/ \---\
    #   q   q   q   q        q   q   q   q        q   q   q   q
    num_key_value_heads: int = None  # None: nkv = nh (MHA)
    head_dim: int = None  # None: C / nh
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None  # {"rope_type": ..., its parameters}: nanotune.models.rope; None: default
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B, small Qwens
    attention_bias: bool = False  # a bias on q, k, v and o (llama, qwen3); qwen2 always biases q, k, v only
    mlp_bias: bool = False  # llama only
    sliding_window: int = None  # mistral only: a query sees the last sliding_window keys, itself included
    bos_token_id: int = None
    eos_token_id: int = None  # an int, or a list (Llama 3.1 ends on any of three)
    pad_token_id: int = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, where: str) -> "Config":
        """Read a transformers config.json dict, as the model_type's own transformers class would."""
        model_type = hf["model_type"]
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported, only 'silu'")
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise UserError(f"{where}: use_sliding_window is true, which nanotune does not implement for "
                            f"{model_type}; set it to false, as Qwen's released checkpoints have it")
        positive_ints(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads"), where)
        optional = ("num_key_value_heads", "head_dim") + (("sliding_window",) if model_type in ("mistral", "phi3")
                                                          else ())
        positive_ints(hf, [key for key in optional if hf.get(key) is not None], where)
        known = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                    "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                                    "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        # The switches only some types read; transformers ignores them in the others, and so do we.
        if model_type in ("llama", "qwen3"):
            known["attention_bias"] = hf.get("attention_bias", False)
        if model_type == "llama":
            known["mlp_bias"] = hf.get("mlp_bias", False)
        if model_type == "mistral":
            known["sliding_window"] = hf.get("sliding_window", 4096)  # MistralConfig's default when absent
        if model_type == "qwen3":
            known.setdefault("head_dim", 128)  # Qwen3Config's default, not C / nh
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        if model_type == "phi3":  # Phi3Config: its own original context, and a rotated share of each head
            known["sliding_window"] = hf.get("sliding_window")
            known["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", 4096)
            known["partial_rotary_factor"] = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
            if rope.get("rope_type", rope.get("type")) in ("su", "yarn"):  # its older names for longrope
                rope["rope_type"] = "longrope"
        if "head_dim" not in known and hf["hidden_size"] % hf["num_attention_heads"]:
            raise UserError(f"{where}: hidden_size {hf['hidden_size']} is not divisible by num_attention_heads "
                            f"{hf['num_attention_heads']}, and no head_dim is given")
        if hf["num_attention_heads"] % known.get("num_key_value_heads", hf["num_attention_heads"]):
            raise UserError(f"{where}: num_attention_heads {hf['num_attention_heads']} is not a multiple of "
                            f"num_key_value_heads {hf['num_key_value_heads']}")
        head_dim = known.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        rope = read_rope(hf, where, int(head_dim * known.get("partial_rotary_factor", 1.0)), rope=rope,
                         types=("default", "longrope") if model_type == "phi3" else ROPE_TYPES,
                         theta=hf.get("rope_theta") or cls.rope_theta,
                         original=known.get("original_max_position_embeddings"))
        known["rope_theta"] = rope.pop("rope_theta")
        if rope["rope_type"] != "default":
            known["rope_scaling"] = rope
        config = cls(model_type=model_type, **known)
        if config.head_dim % 2:
            raise UserError(f"{where}: head_dim {config.head_dim} must be even, since rotary embeddings rotate pairs")
        return config

    def architecture(self) -> str:
        """The transformers class of this model_type."""
        return ARCHITECTURES[self.model_type]

    def to_hf(self) -> dict:
        """The config.json transformers expects, with both rotary spellings so versions 4 and 5 read it."""
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return {"architectures": [self.architecture()], "hidden_act": "silu", **asdict(self),
                "rope_parameters": rope_parameters}


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        qkv_bias = config.attention_bias or config.model_type == "qwen2"
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:  # Qwen3 normalises each head's query and key, which steadies the attention logits
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, ctx):
        B, T, _ = x.shape
        cos, sin = ctx.cos, ctx.sin  # each (B or 1, 1, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:  # over each head's hs, before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs) x2
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = ctx.attend(self, q, k, v, window=self.sliding_window)  # (B, nh, T, hs); query head i reads
        # k/v head i // (nh / nkv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Shazeer 2020)


class Block(nn.Module):
    def __init__(self, config: Config, attention=Attention, mlp=MLP):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp(config)

    def forward(self, x, ctx):
        x = x + self.self_attn(self.input_layernorm(x), ctx)  # pre-norm residual blocks
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """The `model.` part of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, config: Config, attention=Attention, mlp=MLP):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, attention, mlp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(CausalLM):
    config_class = Config
    blocks_path, head_path, embed_path = "model.layers", "lm_head", "model.embed_tokens"
    lora_targets = ("q_proj", "v_proj")
    ignored_keys = ("rotary_emb.inv_freq",)  # older transformers saved the frequencies with the weights
    attention_class, mlp_class = Attention, MLP

    def __init__(self, config: Config):
        super().__init__(config)
        self.model = Trunk(config, self.attention_class, self.mlp_class)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def final_norm(self, x):
        return self.model.norm(x)

    def rotary(self, positions, dtype):
        """cos, sin of shape (B or 1, T, r), r the rotated dimensions of a head (nanotune.models.rope)."""
        config = self.config
        rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
        dim = int(config.head_dim * getattr(config, "partial_rotary_factor", 1.0))
        return rotary_tables(rope, dim, config.max_position_embeddings, positions, dtype)


MODEL_TYPES = {model_type: Llama for model_type in ARCHITECTURES}
