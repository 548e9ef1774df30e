"""Quantized frozen base weights: int8 (LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339) and 4-bit NF4
(QLoRA, Dettmers et al. 2023, arXiv:2305.14314), through bitsandbytes.

`quantize` is a transform like `inject_lora`: it swaps each nn.Linear for a bitsandbytes layer holding
frozen quantized weights. Call it before `inject_lora`, so every LoRALinear wraps a quantized
`base_layer`: the adapter trains in full precision on top of the rounded base. `dequantize` swaps plain
fp32 Linears back in (rounding included) so that `lora.unload` can merge and `save_pretrained` export.
bitsandbytes is optional and imported only here, only when asked for.
"""
import logging
import warnings

import torch
import torch.nn as nn

from nanotune import UserError


# bitsandbytes logs this at every call of an int8 layer whose input is not fp16 (on CUDA in training and
# evaluation, on a CPU in evaluation): a line per layer per forward. The cast is how LLM.int8() computes
# (int8 activations, fp16 outliers: README), not news, so this one message is dropped and no other.
CAST_WARNING = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"


def not_the_cast_warning(record: logging.LogRecord) -> bool:
    return record.msg != CAST_WARNING


def _bitsandbytes():
    # On avx512_bf16 CPUs bitsandbytes logs at import that an optional kernel for its 4-bit inference
    # path is missing; quantize() turns that path off (see below), so the warning would only mislead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    cast_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not_the_cast_warning not in cast_logger.filters:
        cast_logger.addFilter(not_the_cast_warning)
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("--load-in-8bit/--load-in-4bit need bitsandbytes: pip install nanotune[int8]") from None
    return bitsandbytes


def quant_bits(args):
    """The base's quantization from the --load-in-8bit / --load-in-4bit flags: 8 (int8), 4 (NF4) or None."""
    return 8 if args.load_in_8bit else 4 if args.load_in_4bit else None


def quantize(model: nn.Module, bits: int, compute_dtype=torch.float32, double_quant=False, device=None):
    """Replace every nn.Linear but LoRA's and the output head (`model.head_path`, as in QLoRA) by a
    frozen bitsandbytes layer: Linear8bitLt (bits=8) or NF4 Linear4bit computing in `compute_dtype` (bits=4).
    double_quant also quantizes the 4-bit block scales (QLoRA sec. 3). Works on CPU and CUDA: each weight
    moves to `device` (default: where it is) one layer at a time and is quantized there. A weight still on
    the meta device (from_pretrained(device="meta")) is read from the checkpoint here, in fp32, one Linear
    at a time: the full-precision base never exists whole, on the GPU or in CPU memory. Returns the model."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    bnb = _bitsandbytes()
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or name.split(".")[-1] in ("lora_A", "lora_B") or name == getattr(model, "head_path", None):
            continue  # `type is`, not isinstance: bitsandbytes' layers are nn.Linear subclasses
        w = model.weights.read(name + ".weight", torch.float32, device or "cpu") if m.weight.is_meta \
            else m.weight.detach().to(device)  # (out, in)
        shape = (m.in_features, m.out_features, m.bias is not None)
        if bits == 8:
            # threshold=6.0: input columns with an outlier above 6 take an fp16 matmul (LLM.int8() sec. 3.2).
            q = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False, threshold=6.0, device="meta")
            # Row-wise absmax: CB (out, in) int8 = round(127 * W / SCB), SCB (out,) fp32 row maxima.
            # Quantizing here rather than through Int8Params.to(device), which quantizes only CPU tensors.
            CB, SCB, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
            q.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        else:
            # Two 4-bit codes per byte, stored as uint8 (bnb's default quant_storage), (out * in / 2, 1).
            # FSDP1 flattens a unit into one tensor of one dtype and so needs the codes stored as the
            # model's float dtype (the QLoRA+FSDP1 recipe). FSDP2, which nanotune uses, shards each
            # parameter alone, all-gathers mixed dtypes as bytes and never casts a non-float one; a
            # float storage dtype would instead be cast, codes and all, by MixedPrecisionPolicy
            # (param_dtype=bf16 over fp32 weights) or by model.to(dtype). Measured with torch 2.13
            # (gloo, 2 ranks): uint8 trains under both; fp32 storage breaks under param_dtype=bf16.
            q = bnb.nn.Linear4bit(*shape, compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type="nf4", device="meta")
            # Params4bit quantizes (blocks of 64, one absmax each) when moved to a device, CPU included.
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                         quant_type="nf4", module=q).to(w.device)
            # On avx512_bf16 CPUs a Linear4bit in eval() whose input needs no grad repacks its weight, in
            # place and for good, for a bf16 inference kernel with no backward. An evaluation inside
            # training (model.eval() under no_grad) would thus cut the graph through every base layer of
            # the training steps after it. Turning the path off keeps one layout, and evaluation computes
            # exactly as training does (dequantize, then matmul in compute_dtype).
            q.support_avx512bf16_for_cpu = False
        q.bias = m.bias  # biases stay in full precision, trainable if inject_lora's bias mode says so
        model.set_submodule(name, q)
    return model


def dequantized_weight(bnb, layer) -> torch.Tensor:
    """The (out, in) fp32 weight a bitsandbytes layer computes with."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        # After the first forward, bitsandbytes moves the row scales from the weight to layer.state.
        SCB = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, SCB).float()  # CB * SCB / 127
    # FSDP's gathered weight is a plain Parameter without the quantization state; the layer keeps its own.
    state = getattr(layer.weight, "quant_state", None)
    state = layer.quant_state if state is None else state
    return bnb.functional.dequantize_4bit(layer.weight.data, state).float()


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a base layer computes with: a plain Linear's own, a quantized one's
    dequantized to fp32 (a new tensor the size of this one layer: DoRA's weight norm needs it)."""
    if type(layer) is nn.Linear:
        return layer.weight
    return dequantized_weight(_bitsandbytes(), layer)


def dequantize(model: nn.Module):
    """Replace every bitsandbytes Linear (a LoRALinear's base_layer included) by a plain frozen fp32
    nn.Linear holding its dequantized weight. Then lora.unload + save_pretrained export an HF model,
    which computes what the quantized model trained with. Returns the model."""
    bnb = _bitsandbytes()
    replaced = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            continue
        linear = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantized_weight(bnb, m), requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach().float(), requires_grad=m.bias.requires_grad)
        model.set_submodule(name, linear)
        replaced += 1
    if replaced:
        warnings.warn(f"dequantized {replaced} Linear layers: the merged weights carry the quantization rounding "
                      "the adapter was trained on, not the original full-precision weights", stacklevel=2)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, quantization state included (int8 row scales, 4-bit block
    absmax): what model.state_dict() holds. A tensor shared by several keys (tied weights) counts once."""
    return sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())
