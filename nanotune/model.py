"""GPT-NeoX, the architecture of the Pythia family, written from scratch.

Parameter names follow Hugging Face's checkpoint layout exactly, so a Pythia folder
(config.json + *.safetensors + tokenizer.json) loads with no conversion, and what we save
loads in transformers' GPTNeoXForCausalLM. Shapes: B batch, T time, C hidden size,
nh heads, hs head size (C = nh * hs), V vocabulary.
"""
import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from nanotune import UserError

# Tensors that old checkpoints store but that are recomputed here (masks, rotary frequencies).
LEGACY_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


@dataclass
class Config:
    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
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
        if not isinstance(hf, dict):
            raise UserError(f"{where} must hold a JSON object (a transformers config), not {type(hf).__name__}")
        if hf.get("model_type") != "gpt_neox":
            raise UserError(f"{where}: model_type is {hf.get('model_type')!r}, but nanotune only "
                            "supports GPT-NeoX (model_type 'gpt_neox', the Pythia family)")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported, only 'gelu'")
        rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 spelling
        if rope.get("rope_type", "default") != "default":
            raise UserError(f"{where}: rope_type {rope['rope_type']!r} is not supported, only 'default'")
        known = {k: hf[k] for k in cls.__dataclass_fields__ if k in hf}
        known["rotary_pct"] = rope.get("partial_rotary_factor",
                                       hf.get("partial_rotary_factor", hf.get("rotary_pct", cls.rotary_pct)))
        known["rotary_emb_base"] = rope.get("rope_theta",
                                            hf.get("rope_theta", hf.get("rotary_emb_base", cls.rotary_emb_base)))
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in hf:
                raise UserError(f"{where}: the required field {key!r} is missing")
            if type(hf[key]) is not int or hf[key] < 1:
                raise UserError(f"{where}: {key} must be a positive integer, got {hf[key]!r}")
        config = cls(**known)
        if config.hidden_size % config.num_attention_heads:
            raise UserError(f"{where}: hidden_size {config.hidden_size} is not divisible by "
                            f"num_attention_heads {config.num_attention_heads}")
        return config

    def to_hf(self) -> dict:
        """The config.json transformers expects (both rotary spellings, so old and new versions read it)."""
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu",
                **asdict(self), "partial_rotary_factor": self.rotary_pct, "rope_theta": self.rotary_emb_base,
                "torch_dtype": "float32"}


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.rotary_ndims = int(self.head_size * config.rotary_pct)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        # The fused projection's rows are interleaved per head: [q_h0 k_h0 v_h0 q_h1 k_h1 v_h1 ...].
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv.split(self.head_size, dim=-1)  # each (B, nh, T, hs)
        # Partial rotary embeddings (GPT-NeoX paper, sec. 2.1): only the first rotary_ndims of each head rotate.
        r = self.rotary_ndims
        q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), dim=-1)
        k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_size ** -0.5)
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

    def forward(self, x, cos, sin):
        attn = self.attention(self.input_layernorm(x), cos, sin)
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


class GPTNeoX(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.gpt_neox = Trunk(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.grad_checkpoint = False  # train.py --grad-checkpoint; see hidden_states

    def rotary(self, T, device, dtype):
        """cos, sin of shape (T, rotary_ndims), computed in fp32 like transformers, then cast."""
        dim = self.gpt_neox.layers[0].attention.rotary_ndims if self.gpt_neox.layers else 0
        inv_freq = 1.0 / (self.config.rotary_emb_base ** (torch.arange(0, dim, 2, device=device).float() / dim))
        freqs = torch.outer(torch.arange(T, device=device).float(), inv_freq)  # (T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, input_ids):
        """(B, T) token ids -> (B, T, C) final-norm hidden states. Right padding needs no mask: causal
        attention never lets a real token see the pads that follow it."""
        x = self.gpt_neox.embed_in(input_ids)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.rotary(input_ids.shape[1], input_ids.device, dtype)
        for block in self.gpt_neox.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():
                # Keep only the block's input for the backward, which runs the block's forward again
                # to rebuild its activations: memory for one block instead of all, at ~1/3 more compute.
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.gpt_neox.final_layer_norm(x)

    def forward(self, input_ids, labels=None):
        """Logits (B, T, V); or, given labels, the summed loss (see loss_sum). Training goes through
        forward, not loss_sum directly, because DDP and FSDP hook the wrapped module's forward."""
        if labels is not None:
            return self.loss_sum(input_ids, labels)
        return self.embed_out(self.hidden_states(input_ids))

    def loss_sum(self, input_ids, labels, chunk=256):
        """Summed next-token cross-entropy over positions whose label is not -100 (fp32 scalar).

        labels are already shifted (labels[:, t] is the target after input_ids[:, t]). The caller
        divides by the token count of the whole global batch, so every micro-batch, rank and
        accumulation step weighs each token equally. Logits are computed only where a label
        exists, `chunk` rows at a time: the (B*T, V) fp32 logit matrix never exists at once."""
        h = self.hidden_states(input_ids)
        keep = labels != -100
        h, targets = h[keep], labels[keep]  # (N, C), (N,)
        head = self.embed_out
        if type(head) is nn.Linear and head.bias is None:  # a LoRA-adapted head takes the plain loop below
            dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) \
                else head.weight.dtype
            return LinearCrossEntropy.apply(h.to(dtype), head.weight.to(dtype), targets, chunk)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            logits = head(h[i:i + chunk]).float()
            total = total + F.cross_entropy(logits, targets[i:i + chunk], reduction="sum")
        return total


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, target_i) with the gradients computed in the forward, `chunk` rows at a time.

    Plain autograd keeps every chunk's (n, V) logits, their fp32 copy and their log-softmax for the
    backward. Here each chunk's gradient is formed at once instead, since d loss / d logits is just
    softmax - one_hot(target): grad_h = dlogits @ W (n, C), and grad_W += dlogits^T @ h (V, C)
    when the head trains. Only grad_h (N, C) and grad_W outlive the forward, and one (chunk, V)
    buffer serves every chunk: on a CPU, a fresh 50-200 MB tensor per chunk costs more in page
    faults (the kernel zero-fills each new mapping) than the softmax itself. Same idea as
    Liger-Kernel's fused linear cross-entropy. h and W come in the compute dtype; the softmax is fp32.

    On a CPU the softmax runs on CPU_ROWS rows at a time: its passes over a (32, V) fp32 block
    (6 MB at V = 50k) stay in cache, where a whole chunk would go to DRAM on every pass (measured:
    this halves the loss's non-GEMM time at Pythia's vocabulary). A GPU takes the chunk at once."""

    CPU_ROWS = 32

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        N, V = h.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        rows = LinearCrossEntropy.CPU_ROWS if h.device.type == "cpu" else chunk
        logits = h.new_empty(min(chunk, N), V)  # compute dtype: the chunk's logits, then its dlogits
        probs = h.new_empty(min(rows, N), V, dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_w_chunk = torch.empty_like(weight) if need_w and weight.dtype != torch.float32 else None
        total = h.new_zeros((), dtype=torch.float32)
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen here, and out= needs that
            for i in range(0, N, chunk):
                x = h[i:i + chunk]  # (n, C)
                z = torch.matmul(x, weight.t(), out=logits[:x.shape[0]])  # (n, V)
                for j in range(0, x.shape[0], rows):
                    zj = z[j:j + rows]  # (m, V)
                    t = targets[i + j:i + j + zj.shape[0], None]  # (m, 1)
                    top = zj.amax(dim=1, keepdim=True).float()  # subtracted before exp: nothing overflows
                    p = torch.sub(zj, top, out=probs[:zj.shape[0]]).exp_()
                    s = p.sum(dim=1, keepdim=True)
                    total += (top + s.log() - zj.gather(1, t).float()).sum()  # logsumexp - target logit
                    if need_h or need_w:
                        p.div_(s).scatter_add_(1, t, p.new_full(t.shape, -1.0))  # softmax - one_hot(target)
                        zj.copy_(p)
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
        return (grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


def read_config(path: str) -> Config:
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"model folder {path!r} does not exist; pass --model a folder with config.json "
                        "and *.safetensors (a Pythia checkpoint, or nanotune's default assets/tiny-neox)")
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{file} is missing; a model folder needs config.json and *.safetensors") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file} cannot be read as JSON ({e})") from None
    return Config.from_hf(hf, file)


def safetensors_files(path: str) -> list:
    """The weight files of a folder: model.safetensors, or the shards an index names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise UserError(f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); nanotune never unpickles "
                        "weights, since that can run arbitrary code. Convert them once where you trust the file: "
                        "transformers' model.save_pretrained(dir, safe_serialization=True)")
    raise UserError(f"{path} has no model.safetensors (or model.safetensors.index.json with shards)")


def from_pretrained(path, num_layers=-1, dtype=None, device="cpu") -> GPTNeoX:
    """Load a Hugging Face GPT-NeoX folder. num_layers=N keeps only the first N blocks (-1: all).
    dtype defaults to float32, whatever the checkpoint stores. device="meta" builds the model
    without reading a single weight (FSDP ranks that receive theirs from rank 0)."""
    config = read_config(path)
    if num_layers != -1:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise UserError(f"--num-layers {num_layers} is out of range: {path} has "
                            f"{config.num_hidden_layers} layers (use 1..{config.num_hidden_layers}, or -1 for all)")
        config.num_hidden_layers = num_layers
    with torch.device("meta"):  # no memory for weights we are about to overwrite
        model = GPTNeoX(config)
    model.name_or_path = path
    if str(device) == "meta":
        return model.to(dtype or torch.float32)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("embed_out.weight")
    state = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    layer = key.split(".")[2] if key.startswith("gpt_neox.layers.") else None
                    if key.endswith(LEGACY_BUFFERS) or (layer is not None and int(layer) >= config.num_hidden_layers):
                        continue
                    if config.tie_word_embeddings and key == "embed_out.weight":
                        continue  # the same matrix as embed_in
                    if key not in expected:
                        raise UserError(f"{file}: unexpected tensor {key!r}; is this a GPT-NeoX checkpoint?")
                    state[key] = f.get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise UserError(f"{file} cannot be read as safetensors ({e}); the file is damaged or incomplete, "
                            "so copy or download it again") from None
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"{path}: tensor {key!r} is missing from the checkpoint")
        if state[key].shape != shape:
            raise UserError(f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, but config.json "
                            f"implies {tuple(shape)}")
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked above
    if config.tie_word_embeddings:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    return model.to(dtype or torch.float32)


def save_pretrained(model: GPTNeoX, path: str, state_dict: dict = None):
    """Write config.json, model.safetensors and (if the source folder had one) tokenizer.json.
    state_dict: the model's full state when it is sharded (FSDP gathers it for us)."""
    os.makedirs(path, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("embed_out.weight")  # safetensors refuses shared storage; transformers re-ties on load
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    source = os.path.join(getattr(model, "name_or_path", ""), "tokenizer.json")
    if os.path.exists(source) and os.path.abspath(source) != os.path.abspath(os.path.join(path, "tokenizer.json")):
        shutil.copyfile(source, os.path.join(path, "tokenizer.json"))

