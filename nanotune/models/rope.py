"""Rotary scalings: how a config.json stretches rotary embeddings (RoFormer) past the context a model
was pretrained on, each computed as transformers computes it (modeling_rope_utils.py).

  default   base^(-2i/dim): the angle per position of the pair i of `dim` rotated dimensions
  linear    every angle divided by factor (position interpolation, Chen et al. 2023)
  llama3    slow pairs divided by factor, fast pairs kept, a smooth blend between (Llama 3.1)
  dynamic   NTK-aware: once a sequence is longer than max_position_embeddings, the base grows with its
            length, so the slowest pair still turns less than once over it (common in fine-tuning configs)
  yarn      NTK-by-parts (Peng et al. 2023): pairs that turn more than beta_fast times over the original
            context are kept, pairs turning fewer than beta_slow times are divided by factor, a linear
            ramp between; cos and sin scaled by 0.1 ln(factor) + 1 (eq. 21), which sharpens attention
  longrope  one searched factor per pair (Ding et al. 2024): short_factor while a sequence fits in the
            original context, long_factor beyond; cos and sin scaled by sqrt(1 + ln(s) / ln(original))
            (Phi-3, Phi-3.5, Phi-4-mini)
dynamic and longrope depend on the length of the sequence, which a forward takes as its largest
position + 1: transformers' rule, so a cached generation step (one new position) rotates its token
by the frequencies of the whole sequence so far, while the keys already cached keep theirs.
"""
import math

import torch

from nanotune import UserError

# The parameters each type needs besides rope_theta, and those it may have.
REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
            "longrope": ("short_factor", "long_factor"),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
            "longrope": ("factor", "attention_factor")}
WITH_ORIGINAL = ("yarn", "longrope", "llama3")  # types that read original_max_position_embeddings


def read_rope(hf: dict, where: str, dim: int, types=tuple(REQUIRED), rope=None, theta=10000.0,
              original=None) -> dict:
    """The rotary settings of a config.json as one dict: {"rope_type", "rope_theta", its parameters}.
    rope: the settings' dict when the family keeps it elsewhere (Gemma 3's per layer type); else
    rope_scaling (transformers 4), which wins over rope_parameters (5) as in transformers 5. dim:
    the rotated dimensions per head (a longrope factor list has one number per pair). types: those
    this family's transformers class accepts. theta: the base when the dict has no rope_theta (the
    config's own, else the family's default). original: the family config's own
    original_max_position_embeddings, which wins over the rope dict's (Phi-3)."""
    if rope is None:
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope = dict(rope)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in types:
        raise UserError(f"{where}: rope type {kind!r} is not supported for {hf['model_type']}, only "
                        f"{', '.join(map(repr, types))}")
    out = {"rope_type": kind, "rope_theta": rope.get("rope_theta") or theta}
    for key in REQUIRED[kind] + OPTIONAL.get(kind, ()):
        value = rope.get(key)
        if value is None and key not in REQUIRED[kind]:
            continue
        if key.endswith("_factor") and kind == "longrope" and key != "attention_factor":
            if not isinstance(value, list) or len(value) != dim // 2 or \
                    not all(isinstance(x, (int, float)) and x > 0 for x in value):
                raise UserError(f"{where}: longrope's {key} must be a list of {dim // 2} positive numbers (one "
                                f"per rotated pair), got {value!r}")
        elif key != "truncate" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise UserError(f"{where}: {kind} rope scaling needs a positive number {key}, got {value!r}")
        out[key] = value
    if kind in WITH_ORIGINAL:  # transformers: the config's own field (Phi-3), else the rope dict's, else the maximum
        out["original_max_position_embeddings"] = original or rope.get("original_max_position_embeddings") \
            or hf.get("max_position_embeddings")
        if not isinstance(out["original_max_position_embeddings"], int) or out["original_max_position_embeddings"] < 1:
            raise UserError(f"{where}: {kind} rope scaling needs a positive integer original_max_position_embeddings")
    return out


def frequencies(rope: dict, dim: int, max_position_embeddings: int, seq_len, device):
    """(inv_freq (dim/2,) fp32, attention factor) of a forward whose sequence is seq_len long (a 0-dim
    tensor: its largest position + 1, read only by dynamic and longrope, without a device sync)."""
    kind, base = rope["rope_type"], rope["rope_theta"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # 2i / dim
    if kind == "dynamic":  # base * (s L / L0 - (s - 1))^(dim / (dim - 2)), L at least L0 = max_position_embeddings
        factor, longest = rope["factor"], max_position_embeddings
        base = base * ((factor * seq_len.clamp(min=longest) / longest) - (factor - 1)) ** (dim / (dim - 2))
    if kind == "longrope":
        original = rope["original_max_position_embeddings"]
        factor = rope.get("factor") or max_position_embeddings / original
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        factors = torch.where(seq_len > original, torch.tensor(rope["long_factor"], device=device),
                              torch.tensor(rope["short_factor"], device=device))  # (dim/2,) fp32
        return 1.0 / (factors * base ** exponents), attention
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        return inv_freq / rope["factor"], 1.0
    if kind == "llama3":
        return llama3(inv_freq, **{k: rope[k] for k in REQUIRED["llama3"] + ("original_max_position_embeddings",)}), 1.0
    if kind == "yarn":
        return yarn(rope, dim, base, exponents)
    return inv_freq, 1.0


def llama3(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's long-context rotary (Meta's reference, apply_scaling): pairs whose wavelength is
    longer than the original context / low_freq_factor turn factor times slower, pairs shorter than
    context / high_freq_factor are kept, and the band between blends the two smoothly."""
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelength < original_max_position_embeddings / high_freq_factor, inv_freq,
                       torch.where(wavelength > original_max_position_embeddings / low_freq_factor,
                                   inv_freq / factor, blended))


def yarn(rope, dim, base, exponents):
    """YaRN's frequencies and attention factor (Peng et al. 2023, sec. 3.2-3.4)."""
    factor, original = rope["factor"], rope["original_max_position_embeddings"]

    def mscale(scale, m=1.0):  # eq. 21: 0.1 m ln(s) + 1
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention = rope.get("attention_factor")
    if attention is None:
        attention = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"]) \
            if rope.get("mscale") and rope.get("mscale_all_dim") else mscale(factor)

    def pair(rotations):  # the (fractional) pair index that turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = pair(rope.get("beta_fast") or 32), pair(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(exponents.device)
    keep = 1 - ramp  # 1: the pair extrapolates (kept), 0: it interpolates (divided by factor)
    powers = base ** exponents
    return (1.0 / (factor * powers)) * (1 - keep) + (1.0 / powers) * keep, attention


def rotary_tables(rope: dict, dim: int, max_position_embeddings: int, positions, dtype, interleaved=False):
    """cos, sin (B or 1, T, dim) of positions (B or 1, T) in the rotate-half layout (pair i with
    i + dim/2), or interleaved (pair 2i, 2i + 1: GLM), computed in fp32 and scaled by the attention
    factor, then cast, as transformers does."""
    seq_len = positions.max() + 1
    inv_freq, attention = frequencies(rope, dim, max_position_embeddings, seq_len, positions.device)
    freqs = positions[..., None].float() * inv_freq  # (B, T, dim/2)
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention).to(dtype), (emb.sin() * attention).to(dtype)
