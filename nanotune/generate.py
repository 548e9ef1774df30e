"""Try a model: python -m nanotune.generate --model DIR [--adapter DIR] --prompt TEXT [--input TEXT]
                  python -m nanotune.generate --model DIR [--adapter DIR] --chat      (a conversation)

The prompt is rendered with the chat template training used (--template, default: the model
folder's own, alpaca without one), so an adapter answers in the format it was trained on, and
generation stops at the end of the model's turn (any of its EOS ids or the template's end-of-turn
token). generate() is also what train.py's exact-match evaluation runs, batched over held-out rows.
"""
import argparse
import sys

import torch

from nanotune import UserError
from nanotune.data import alpaca_user
from nanotune.distributed import pick_device
from nanotune.lora import load_adapter
from nanotune.models import from_pretrained
from nanotune.models.base import Cache
from nanotune.templates import NAMES as TEMPLATES, load_template
from nanotune.tokenizer import load_tokenizer


@torch.no_grad()
def generate(model, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, eos=(), generator=None,
             keep=None, device=None, agree=None, with_stop=False, finished=all):
    """The new token ids of each prompt (a list of token-id lists, any lengths), generated together.

    The prompts are left-padded into one (B, T) batch, so that every row's next token comes from its
    last column, and run through the model once (the prefill), which keeps each layer's keys and
    values in a Cache. Each step then feeds only the B new tokens, which attend to the cached keys:
    O(T) work per token instead of rerunning all T positions, and logits for the last position only.
    A row counts its positions from its first real token and no query sees a pad (Cache.real), so it
    computes what it would alone. Greedy when temperature is 0; else sampled at that temperature from
    the top_k most likely tokens (0: all) and, within them, the fewest whose probabilities reach
    top_p (nucleus sampling, Holtzman et al. 2019). A row stops at any id in `eos` (returned with
    with_stop, as GRPO trains on it), or when keep(row, its new ids so far) returns False (exact-match
    scoring stops a row that can no longer equal its reference); generation ends when finished(the rows'
    done flags) says so (default: every row has stopped) or after max_new_tokens. `model` may be wrapped
    (DDP, FSDP, DeepSpeed): it is only called, so every rank of a sharded model takes part in each forward
    (keep must then answer alike on every rank; ranks generating different prompts agree in finished).

    device: where the inputs go (None: where the model's first parameter is; under FSDP's CPU offload
    that is CPU memory while the model computes on the GPU, so train.py passes its device). agree: under
    a process group, a function that returns rank 0's (B,) tokens on every rank (train.py passes
    broadcast_from_rank0). Every rank then stops each row at the same step, so all take the same number
    of forwards, each a collective under FSDP and ZeRO-3, even if their logits ever differ in a bit."""
    device = device or next(model.parameters()).device
    B, T = len(prompts), max(map(len, prompts))
    if min(map(len, prompts)) == 0:
        raise UserError("generate: every prompt needs at least one token")
    ids = torch.zeros(B, T, dtype=torch.long)
    real = torch.zeros(B, T, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):] = torch.tensor(prompt)
        real[row, T - len(prompt):] = True
    ids, real = ids.to(device), real.to(device)
    positions = (real.cumsum(1) - 1).clamp(min=0)  # (B, T): 0 at each row's first token
    cache = Cache(T + max_new_tokens, real if not real.all() else None)
    logits = model(ids, positions=positions, cache=cache)  # (B, V)
    # A model whose rotary angles change once the sequence passes a length recomputes its cache there
    # (Phi-3 with longrope, as transformers does): it needs every token fed so far, and their positions.
    recompute_past = getattr(getattr(model, "module", model), "recompute_past", None)  # DDP/DeepSpeed: .module
    fed, fed_positions = ids, positions  # (B, L) each
    new, done = [[] for _ in prompts], [False] * B
    for step in range(max_new_tokens):
        token = pick(logits.float(), temperature, top_k, top_p, generator)  # (B,)
        if agree is not None:
            token = agree(token).to(device)
        for row, t in enumerate(token.tolist()):
            if done[row] or t in eos:
                if with_stop and not done[row]:
                    new[row].append(t)
                done[row] = True
                continue
            new[row].append(t)
            done[row] = keep is not None and not keep(row, new[row])
        if finished(done) or step == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1  # (B, 1)
        if cache.real is not None:
            cache.real = torch.cat((cache.real, torch.ones(B, 1, dtype=torch.bool, device=device)), dim=1)
        fed, fed_positions = torch.cat((fed, token[:, None]), 1), torch.cat((fed_positions, positions), 1)
        if fed.shape[1] - 1 == recompute_past:
            cache = Cache(T + max_new_tokens, cache.real)
            logits = model(fed, positions=fed_positions, cache=cache)
        else:
            logits = model(token[:, None], positions=positions, cache=cache)
    return new


def pick(logits, temperature, top_k, top_p, generator):
    """The next token of each row, (B,), from its logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # the likelier tokens already reach top_p (the first never)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    probs = logits.softmax(-1).cpu()  # sampled on the CPU, so a seed gives the same tokens on any device
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


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
    p.add_argument("--top-p", type=float, default=1.0, help="sample only among the fewest likeliest tokens whose "
                   "probabilities reach p (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    args = p.parse_args(argv)
    if (args.prompt is None) == (not args.chat):
        p.error("give --prompt TEXT, or --chat for a conversation")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--temperature", args.temperature),
                        ("--top-k", args.top_k)):
        if value < 0:
            p.error(f"{flag} must be >= 0, got {value}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
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
        new = generate(model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       template.stop_ids, generator)[0]
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
