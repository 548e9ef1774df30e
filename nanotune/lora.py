"""LoRA (Hu et al. 2021, arXiv:2106.09685), added to any model from outside.

`inject_lora` swaps chosen nn.Linear modules for `LoRALinear`, which keeps the frozen layer as
`base_layer` and adds a low-rank update:  y = W x + b + B(A(dropout(x))) * scaling.
Module names match PEFT's, so an adapter saved here is a PEFT adapter and vice versa:
`<path>.lora_A.weight` is (r, in), `<path>.lora_B.weight` is (out, r), zero-initialised so the
adapted model starts exactly equal to the base. `DoRALinear` adds DoRA's trained magnitude
(`<path>.lora_magnitude_vector`, (out,)) on top. This file knows nothing of the model it adapts
beyond three optional attributes: `head_path`, the output head that 'all-linear' leaves alone (as
PEFT does), `head_aliases`, other names PEFT may save that head under, and `lora_targets`, the
Linears to adapt when none are named.
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from nanotune import UserError
from nanotune.quantize import dense_weight

BIAS_MODES = ("none", "all", "lora_only")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
# PEFT LoraConfig options that change what an adapter computes and that nanotune does not implement:
# load_adapter refuses an adapter that turns one on, rather than compute something else.
UNSUPPORTED_PEFT_OPTIONS = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
                            "exclude_modules": "modules left out of target_modules",
                            "lora_bias": "a bias on lora_B", "fan_in_fan_out": "transposed Conv1D weights",
                            "target_parameters": "LoRA on bare parameters"}


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype=torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        device = base_layer.weight.device
        if device.type == "meta":  # a base each rank reads shard by shard later (FSDP, ZeRO-3): the adapter is
            device = torch.device("cpu")  # small, made whole on every rank, alike from the same seed
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: A random, B zero
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) keeps the update's scale stable as r grows.
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (lora * self.scaling).to(y.dtype)

    def delta_weight(self):
        """The update as a dense (out, in) matrix: scaling * B @ A, in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:  # merging twice would add the update twice
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, arXiv:2402.09353, eq. 5): the adapted weight split into a direction and
    a trained magnitude m (out,),

        W' = m * (W + s B A) / ||W + s B A||_c        (s = scaling)

    ||.||_c is the norm of each output row of the (out, in) weight (the paper's columns: it writes W as
    (in, out)). m starts at ||W||_c, so with B = 0 the adapted model starts equal to the base. As in
    sec. 4.3, and as peft computes it, the norm is taken without gradient: m / ||.||_c is then a
    per-output scale, and the forward needs no (out, in) matrix in the graph:

        y = W x + b + (m / ||W + s B A||_c - 1) W x + (m / ||W + s B A||_c) s B A x

    The norm needs W itself, dequantized over a quantized base: one layer's at a time, then freed."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype=torch.float32, weight=None):
        super().__init__(base_layer, r, alpha, dropout, rslora, dtype)
        # m starts at ||W||_c: from `weight` (out, in) where the base is not read yet (on the meta device:
        # FSDP and ZeRO-3 read it once sharded); left empty there without one, for load_adapter to fill.
        weight = dense_weight(base_layer) if weight is None else weight
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(weight.shape[0], dtype=dtype) if weight.is_meta else self.weight_norm(weight.to(dtype)))

    @torch.no_grad()
    def weight_norm(self, weight):
        """||W + s B A||_c, (out,), for W (out, in) in the LoRA weights' dtype; never differentiated."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(weight.dtype)  # (out, r) @ (r, in)
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    def base_product(self, x):
        """W x, W dequantized and cast to x's dtype, without the bias."""
        return F.linear(x, dense_weight(self.base_layer).to(x.dtype))

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        x = x.to(self.lora_A.weight.dtype)
        scale = self.lora_magnitude_vector / self.weight_norm(dense_weight(self.base_layer).to(x.dtype))  # (out,)
        if self.training and isinstance(self.dropout, nn.Dropout):
            # The direction term must see the same dropped input as B A, so W x is computed again on it
            # (peft's choice; an extra matmul per adapted layer). Recomputed in the backward instead of
            # keeping W: a dequantized or cast W per layer would otherwise stay in memory until then.
            x = self.dropout(x)
            base = checkpoint(self.base_product, x, use_reentrant=False)
        else:  # the base output already holds W x (dropout off, or evaluation)
            base = y if self.base_layer.bias is None else y - self.base_layer.bias
        lora = self.lora_B(self.lora_A(x))
        return (y + (scale - 1) * base + scale * lora * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """W <- m / ||W + s B A||_c * (W + s B A); the bias is not scaled (it is outside the norm)."""
        if not self.merged:
            w = self.base_layer.weight
            adapted = w.float() + self.delta_weight()
            self.merged_scale = (self.lora_magnitude_vector.float() / torch.linalg.norm(adapted, dim=1))[:, None]
            w.copy_((self.merged_scale * adapted).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:  # the merged weight's norm is |m|, not W's: divide by the scale merge applied
            w = self.base_layer.weight
            w.copy_((w.float() / self.merged_scale - self.delta_weight()).to(w.dtype))
            self.merged = False


def block_index(name: str):
    """The transformer-block index in a module path like 'model.layers.3.self_attn...' (or None)."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_names(model: nn.Module):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n]


def inject_lora(model: nn.Module, target_modules=None, r=8, alpha=32, dropout=0.1,
                bias="none", modules_to_save=(), dtype=torch.float32, rslora=False, layers=None, dora=False,
                base_weight=None):
    """Replace every nn.Linear whose name equals a target, or ends with '.'+target, by a LoRALinear
    (a DoRALinear if dora), then freeze everything but the adapter's weights, the chosen biases and
    `modules_to_save`.
    target_modules="all-linear" adapts every Linear but the output head; None, the model's
    `lora_targets` (PEFT's default for its family). layers restricts the adapted Linears to those
    block indices (PEFT's layers_to_transform). base_weight(name): the (out, in) weight of Linear `name`
    for DoRA's magnitude where the base is still on the meta device (read from the checkpoint, one at a
    time). Returns the model."""
    if target_modules is None:
        target_modules = model.lora_targets
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if r <= 0:
        raise UserError(f"--lora-r must be a positive integer, got {r}")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {dropout}")
    if bias not in BIAS_MODES:
        raise UserError(f"--lora-bias {bias!r} is not one of {', '.join(BIAS_MODES)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already carries LoRA layers; load or inject one adapter only")
    linears = linear_names(model)
    if list(target_modules) == ["all-linear"]:
        chosen = [n for n in linears if n != getattr(model, "head_path", None)]
    else:
        chosen = [n for n in linears if matches(n, target_modules)]
    if layers is not None:
        chosen = [n for n in chosen if block_index(n) in set(layers)]
    if not chosen:
        raise UserError(f"--lora-target {' '.join(target_modules)}"
                        f"{'' if layers is None else f' with --lora-layers {layers}'} matches no Linear module; "
                        f"the model's Linear modules are: {', '.join(sorted({n.split('.')[-1] for n in linears}))} "
                        f"(e.g. {linears[0]})")
    module_names = {n for n, _ in model.named_modules()}
    for name in modules_to_save:
        if not any(matches(n, [name]) for n in module_names):
            raise UserError(f"--modules-to-save {name!r} matches no module; top-level modules are: "
                            f"{', '.join(n for n, _ in model.named_children())}")
    for name in chosen:
        base = model.get_submodule(name)
        if not dora:
            layer = LoRALinear(base, r, alpha, dropout, rslora, dtype)
        else:
            weight = base_weight(name) if base_weight is not None and base.weight.is_meta else None
            layer = DoRALinear(base, r, alpha, dropout, rslora, dtype, weight)
        model.set_submodule(name, layer)
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         # PEFT accepts "all-linear" only as a string, not in a list
                         "target_modules": "all-linear" if list(target_modules) == ["all-linear"]
                         else list(target_modules), "bias": bias,
                         "modules_to_save": list(modules_to_save) or None, "use_rslora": rslora, "use_dora": dora,
                         "layers_to_transform": list(layers) if layers is not None else None}
    owners = {}  # a tied tensor (tie_word_embeddings) is one parameter under several names
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(p, []).append(name)
    for names in owners.values():
        trained = [n for n in names if is_adapter_param(n, model.lora_config)]
        if len(names) > 1 and trained:
            other = next(n for n in names if n != trained[0])
            raise UserError(f"--modules-to-save cannot train {trained[0]}: it is one tensor with {other} "
                            "(tied embeddings), which the adapter would change too; leave it out")
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name, model.lora_config))
    return model


def is_adapter_param(name: str, config: dict) -> bool:
    """Does this parameter belong to the adapter (trained, and saved with it)? PEFT's rule per bias mode."""
    if ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector"):
        return True
    parts = name.split(".")[:-1]  # the owning module's path, and every module above it
    if any(matches(".".join(parts[:i]), config["modules_to_save"] or []) for i in range(1, len(parts) + 1)):
        return True
    if name.endswith("bias"):
        return config["bias"] == "all" or (config["bias"] == "lora_only" and ".base_layer." in name)
    return False


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge(model):
    """Fold every adapter into its base weight (W += scaling * B A; DoRA's scaled as it says); the
    forward then skips LoRA."""
    for m in lora_layers(model):
        m.merge()


def unmerge(model):
    for m in lora_layers(model):
        m.unmerge()


def unload(model):
    """Merge, then put each base layer back in place of its LoRALinear: a plain model again."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            model.set_submodule(name, m.base_layer)
    return model


def save_adapter(model, path: str, state_dict: dict = None):
    """Write adapter_config.json + adapter_model.safetensors, the files peft.PeftModel.from_pretrained
    reads. state_dict: the model's full state when it is sharded (FSDP gathers it for us)."""
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous()
               for k, v in state.items() if is_adapter_param(k, model.lora_config)}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **model.lora_config, "fan_in_fan_out": False,
              "base_model_name_or_path": getattr(model, "name_or_path", None), "inference_mode": True}
    for alias, name in getattr(model, "head_aliases", {}).items():  # written under both names, read under either
        if name in (config["modules_to_save"] or []):
            config["modules_to_save"] = config["modules_to_save"] + [alias]
            tensors[PEFT_PREFIX + alias + ".weight"] = tensors[PEFT_PREFIX + name + ".weight"].clone()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(model, path: str, dtype=torch.float32):
    """Inject LoRA as adapter_config.json describes, then load its tensors; every tensor must fit."""
    file = os.path.join(path, "adapter_config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read adapter config {file} ({e}); --adapter wants a folder with "
                        "adapter_config.json and adapter_model.safetensors") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key, what in UNSUPPORTED_PEFT_OPTIONS.items():
        if config.get(key):  # absent, null, false or empty: the option is off
            raise UserError(f"{file} sets {key} ({what}), which nanotune's LoRA does not implement; "
                            "retrain the adapter without it, or merge it with peft")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if config.get(key) is None]
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)}; it is not a complete PEFT LoRA adapter config")
    target = config.get("target_modules")
    if isinstance(target, str) and target != "all-linear":
        raise UserError(f"{file}: target_modules is the regular expression {target!r}, which nanotune does not "
                        "read; save the adapter with target_modules as a list of module names")
    aliases = getattr(model, "head_aliases", {})
    to_save = list(dict.fromkeys(aliases.get(m, m) for m in config.get("modules_to_save") or ()))
    inject_lora(model, config["target_modules"], config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                config.get("bias", "none"), to_save, dtype,
                config.get("use_rslora", False), config.get("layers_to_transform"), config.get("use_dora", False))
    expected = {PEFT_PREFIX + n: p for n, p in model.named_parameters() if is_adapter_param(n, model.lora_config)}
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(weights):
        raise UserError(f"{weights} is missing (nanotune reads adapters only as safetensors, never pickle)")
    found = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            name = key.replace(".default.", ".")  # PEFT's adapter name, if it was kept
            for alias, head in aliases.items():
                name = name.replace(PEFT_PREFIX + alias + ".", PEFT_PREFIX + head + ".")
            found[name] = f.get_tensor(key)
    layers_hint = "(if it was trained with --num-layers, pass the same --num-layers)"
    for key, p in expected.items():
        if key not in found:
            raise UserError(f"{weights} lacks {key!r}: the adapter does not fit this model {layers_hint}")
        if found[key].shape != p.shape:
            raise UserError(f"{weights}: {key!r} has shape {tuple(found[key].shape)} but the model needs "
                            f"{tuple(p.shape)}: the adapter was trained for another model")
        if ".lora_A." in key or ".lora_B." in key:
            with torch.no_grad():
                p.copy_(found.pop(key))  # in --lora-dtype
        else:  # a bias or a module trained in full: in fp32, as it trained, whatever dtype the base was read in
            # (and in place of a base tensor not read yet: FSDP, ZeRO-3); cast_frozen casts it where it must
            t = found.pop(key).to("cpu" if p.is_meta else p.device, torch.float32)
            torch.utils.swap_tensors(p, nn.Parameter(t, requires_grad=p.requires_grad))
    if found:
        raise UserError(f"{weights} has tensors this model cannot take: {', '.join(sorted(found)[:5])} {layers_hint}")
    return model
