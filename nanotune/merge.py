"""Fold a LoRA adapter into its base: python -m nanotune.merge --model DIR --adapter DIR --out DIR

The result is a plain HF-layout folder of the base's family (config.json, model.safetensors or its
shards above --max-shard-size, in the base's dtype or --save-dtype; the tokenizer files, a
generation_config.json that stops where the chat template's turns end) whose logits equal the
adapted model's, loadable by transformers with no peft installed. An adapter
trained on a quantized base takes the same --load-in-8bit / --load-in-4bit [--double-quant] flags it
was trained with (a PEFT adapter does not record them), so it merges onto the rounding it learned on.
"""
import argparse
import os
import sys

from nanotune import UserError
from nanotune.checkpoint import atomic_dir, check_writable
from nanotune.lora import load_adapter, unload
from nanotune.models import MAX_SHARD_SIZE, SAVE_DTYPES, from_pretrained, parse_size, save_pretrained
from nanotune.quantize import dequantize, quant_bits, quantize
from nanotune.templates import NAMES as TEMPLATES, export, load_template
from nanotune.tokenizer import load_tokenizer


def merge_adapter(model_dir, adapter_dir, out_dir, num_layers=-1, quant_bits=None, double_quant=False,
                  template="auto", dtype=None, max_shard_size=None):
    """quant_bits: the adapter was trained on an int8 (8) or NF4 (4) base (double_quant: with its block
    scales quantized too). The base is quantized the same way, deterministically, then dequantized,
    so the merged weights are what the adapter trained against, rounding included (a warning says so).
    template: the chat template the adapter was trained with, which the merged folder carries. dtype and
    max_shard_size: as save_pretrained's (None: the base's dtype, 5GB shards)."""
    model = from_pretrained(model_dir, num_layers=num_layers)
    chat = load_template(template, model_dir, load_tokenizer(model_dir, model.config.vocab_size))
    if quant_bits:
        model = quantize(model, quant_bits, double_quant=double_quant)
    model = load_adapter(model, adapter_dir)
    if quant_bits:
        model = dequantize(model)
    with atomic_dir(out_dir) as tmp:
        save_pretrained(unload(model), tmp, dtype=dtype, max_shard_size=max_shard_size)
        export(chat, tmp)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the base model folder the adapter was trained on")
    p.add_argument("--adapter", required=True, help="PEFT-format LoRA adapter folder")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--num-layers", type=int, default=-1, help="the --num-layers the adapter was trained with")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-in-8bit", action="store_true", help="the adapter was trained on an int8 base: "
                       "merge onto the same rounding")
    quant.add_argument("--load-in-4bit", action="store_true", help="the adapter was trained on an NF4 base")
    p.add_argument("--double-quant", action="store_true", help="with --load-in-4bit: trained with --double-quant")
    p.add_argument("--template", default="auto", choices=TEMPLATES, help="the chat template the adapter was trained "
                   "with: the merged folder renders and stops as it does")
    p.add_argument("--save-dtype", choices=list(SAVE_DTYPES), help="dtype of the merged weights (None: the base "
                   "checkpoint's own)")
    p.add_argument("--max-shard-size", default=MAX_SHARD_SIZE, help="split the weights into "
                   "model-0000X-of-0000N.safetensors files of at most this size (5GB, 500MB, 2GiB)")
    args = p.parse_args(argv)
    if args.double_quant and not args.load_in_4bit:
        p.error("--double-quant applies to --load-in-4bit only")
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and not os.listdir(args.out)):
        sys.exit(f"error: --out {args.out} already exists and is not an empty folder; the merged model replaces "
                 "whatever is there, so choose a new --out")
    try:
        check_writable(os.path.dirname(os.path.abspath(args.out)))
        merge_adapter(args.model, args.adapter, args.out, args.num_layers, quant_bits(args), args.double_quant,
                      args.template, SAVE_DTYPES.get(args.save_dtype), parse_size(args.max_shard_size))
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"merged {args.adapter} into {args.model}: {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
