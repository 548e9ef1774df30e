"""The precision switch: one string decides weight dtypes, autocast and loss scaling.

  32 / 32-true      fp32 weights and compute
  bf16 / bf16-mixed fp32 trainable weights, matmuls autocast to bf16
  16 / 16-mixed     same with fp16, plus a gradient scaler (fp16's small range underflows gradients)
  bf16-true         every weight and all compute in bf16, for the biggest models
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from nanotune import UserError

ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
CHOICES = ["32", "16", "bf16", "32-true", "16-mixed", "bf16-mixed", "bf16-true"]


@dataclass
class Precision:
    name: str
    compute_dtype: torch.dtype  # what matmuls run in
    autocast: bool  # mixed: weights stay fp32, torch.autocast casts per operation

    @property
    def autocast_dtype(self):
        """The dtype autocast computes in (and FSDP gathers weights in, DeepSpeed's engine autocasts
        to): bf16 or fp16 in the mixed modes, None where no autocast runs."""
        return self.compute_dtype if self.autocast else None

    def context(self, device: torch.device):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def scaler(self, device: torch.device):
        """fp16-mixed scales the loss so small gradients survive fp16; it skips a step whose
        gradients overflowed and lowers the scale. In other modes the scaler is disabled, and a
        disabled GradScaler passes everything through unchanged (so the loop needs no branches)."""
        return torch.amp.GradScaler(device.type, enabled=self.compute_dtype == torch.float16)


def resolve(name: str, device: torch.device) -> Precision:
    name = ALIASES.get(name, name)
    if name not in CHOICES:
        raise UserError(f"--precision {name!r} is not one of {', '.join(CHOICES)}")
    if name == "16-mixed" and device.type == "cpu":
        raise UserError("--precision 16 is refused on a CPU: fp16 matmuls there run hundreds of times slower "
                        "than fp32; use --precision bf16 (or 32)")
    dtype = {"32-true": torch.float32, "16-mixed": torch.float16}.get(name, torch.bfloat16)
    return Precision(name, dtype, autocast=name.endswith("-mixed"))


def load_dtype(p: Precision):
    """The dtype the checkpoint's tensors are cast to as they are read (models.load_weights): the one they
    are kept in where that is known before LoRA decides what trains, fp32 under 32-true, bf16 for all under
    bf16-true. Under the mixed modes a Linear stays in the compute dtype only if it is frozen, so the base
    is read as the checkpoint stores it (bf16, mostly: no copy is larger than the file) and cast_frozen
    casts each weight once that is known. Casting later gives the same numbers: every cast goes through
    fp32, which holds bf16 and fp16 exactly. (A quantized base's Linears are read by quantize, in fp32.)"""
    return {"32-true": torch.float32, "bf16-true": torch.bfloat16}.get(p.name)


def matmul_precision(p: Precision, device: torch.device):
    """fp32 matmuls on a GPU use TF32 tensor cores (inputs rounded to 10 mantissa bits, fp32
    accumulation; several times the fp32 rate of an A100 or H100), except under --precision 32, which
    is the exact mode: there every matmul is IEEE fp32, as on the CPU. The mixed modes and bf16-true
    compute in 16 bits already; the fp32 matmuls they keep (LoRA's A and B under bf16-true) lose
    less to TF32 than bf16 loses everywhere else. The CPU's matmuls are left as they are."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest" if p.name == "32-true" else "high")


def cast_frozen(model: nn.Module, p: Precision):
    """Put each weight in the dtype it is kept in, once LoRA (or --no-lora) has chosen what trains.

    Under autocast a Linear's weight and bias are cast to the compute dtype on every call anyway,
    so keeping the frozen ones there is exact and saves the cast and the memory. Norms and
    embeddings run in their own dtype, so they stay fp32, as does everything that trains (AdamW
    updates fp32 weights), and so does an output head tied to the embedding (Llama 3.2, small
    Qwens): it is the embedding's tensor, and casting it would put the whole residual stream in
    bf16. bf16-true casts everything but LoRA's weights (which keep --lora-dtype) to bf16, 32-true to
    fp32. The base may arrive in the checkpoint's own dtype (load_dtype), so this also casts up."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        frozen_linear = type(module) is nn.Linear and not any(q.requires_grad for q in module.parameters()) \
            and id(module.weight) not in embeddings
        dtype = p.compute_dtype if p.name == "bf16-true" or (p.autocast and frozen_linear) else torch.float32
        for param_name, param in module.named_parameters(recurse=False):
            if ".lora_" in f".{name}.{param_name}":  # lora_A, lora_B, lora_magnitude_vector keep --lora-dtype
                continue
            if param.is_floating_point() and param.dtype != dtype:  # int8 / packed 4-bit codes keep theirs
                param.data = param.data.to(dtype)
    return model
