"""Try a model: python -m nanotune.generate --model DIR [--adapter DIR] --prompt TEXT [--input TEXT]
                  python -m nanotune.generate --model DIR [--adapter DIR] --chat      (a conversation)

The prompt is rendered with the chat template training used (--template, default: the model
folder's own, alpaca without one), so an adapter answers in the format it was trained on, and
generation stops at the end of the model's turn (any of its EOS ids or the template's end-of-turn
token). No KV cache: each new token reruns the whole sequence, which is simple and fast enough for
the model sizes one tries on a laptop.
"""
import argparse
import sys

import torch

from nanotune import UserError
from nanotune.data import alpaca_user
from nanotune.distributed import pick_device
from nanotune.lora import load_adapter
from nanotune.models import from_pretrained
from nanotune.templates import NAMES as TEMPLATES, load_template
from nanotune.tokenizer import load_tokenizer


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens=64, temperature=0.0, top_k=0, eos=(), generator=None):
    """Extend a list of token ids; greedy when temperature is 0, else sampled from the top_k
    (0: all) most likely tokens. Stops at any id in `eos` (not returned). Returns only the new ids."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float()  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if top_k:
                logits[logits < torch.topk(logits, min(top_k, len(logits))).values[-1]] = -float("inf")
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        if token in eos:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--adapter", help="PEFT-format LoRA adapter folder to apply on top of --model")
    p.add_argument("--num-layers", type=int, default=-1, help="keep only the first N blocks, as the adapter "
                   "was trained with (-1: all)")
    p.add_argument("--prompt", help="the instruction text (or use --chat)")
    p.add_argument("--input", default="", help="the input the instruction works on (Alpaca's input field)")
    p.add_argument("--chat", action="store_true", help="a conversation on the terminal, one line per turn "
                   "(end it with Ctrl-D)")
    p.add_argument("--system", help="a system prompt (None: the template's default, if it has one)")
    p.add_argument("--template", default="auto", choices=TEMPLATES, help="the chat template, as in training")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    args = p.parse_args(argv)
    if (args.prompt is None) == (not args.chat):
        p.error("give --prompt TEXT, or --chat for a conversation")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--temperature", args.temperature),
                        ("--top-k", args.top_k)):
        if value < 0:
            p.error(f"{flag} must be >= 0, got {value}")
    try:
        device = pick_device(args.device)
        model = from_pretrained(args.model, num_layers=args.num_layers)
        if args.adapter:
            load_adapter(model, args.adapter)
        tokenizer = load_tokenizer(args.model, model.config.vocab_size)
        template = load_template(args.template, args.model, tokenizer)
    except UserError as e:
        sys.exit(f"error: {e}")
    model.to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)

    def answer(turns):
        try:
            prompt = template.prompt(args.system, turns, where="the conversation")
        except UserError as e:
            sys.exit(f"error: {e}")
        new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, template.stop_ids, generator)
        return tokenizer.decode(new).strip()

    if not args.chat:
        print(answer([("user", alpaca_user(args.prompt, args.input))]))
        return
    turns = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        turns.append(("user", line))
        turns.append(("assistant", answer(turns)))
        print(turns[-1][1])


if __name__ == "__main__":
    main()
