"""Instruction data: read rows, render them with the model's chat template, mask, batch.

Row formats (.json array or .jsonl, one object per line):
  Alpaca    {"instruction", "input", "output", optional "system"}
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|..., "value": ...}, ...], optional "system"}
  plain     {"text"}
A chat row becomes (system, [(role, text), ...]) and is rendered by a template (nanotune.templates:
the model folder's own by default), which also says which tokens the loss sees: by default each
answer and the token that ends it. A plain row is trained on every token.

    python -m nanotune.data --model DIR --data FILE --show 3      # see exactly what the loss sees
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

from nanotune import UserError
from nanotune.loss import IGNORE
from nanotune.templates import NAMES, load_template
from nanotune.tokenizer import load_tokenizer
USER_ROLES = {"human": "user", "user": "user", "observation": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "function_call": "assistant"}


def alpaca_user(instruction: str, input_text: str = "") -> str:
    """An Alpaca row's user turn: the instruction, then its input section when there is one."""
    return instruction + (f"\n\n### Input:\n{input_text}" if input_text else "")


def read_rows(path: str):
    """Yield (where, row) with where = 'file line N' (.jsonl) or 'file row N' (.json array)."""
    if not os.path.isfile(path):
        problem = "is a folder" if os.path.isdir(path) else "does not exist"
        raise UserError(f"data file {path!r} {problem}; pass --data a .json or .jsonl file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    if path.endswith(".jsonl"):
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"{path} line {i}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {i} is not valid JSON ({e.msg})") from None
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); use a JSON array of "
                        "rows, or .jsonl with one row per line") from None
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a JSON array of rows, not a {type(rows).__name__}")
    if not rows:
        raise UserError(f"{path} holds an empty JSON array; it needs at least one row")
    for i, row in enumerate(rows, 1):
        yield f"{path} row {i}", row


def field(row: dict, key: str, where: str, required=True) -> str:
    value = row.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"must be a string, not {type(value).__name__}"
        raise UserError(f"{where}: field {key!r} {problem}")
    return value


def turns(row, where: str):
    """A row -> (system, [(role, text), ...]) with role 'user' or 'assistant', or (None, None) for plain text."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: each row must be a JSON object, not {type(row).__name__}")
    system = field(row, "system", where, required=False) or None
    if "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list) or not conv:
            raise UserError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
        out = []
        for j, msg in enumerate(conv):
            at = f"{where} conversations[{j}]"
            if not isinstance(msg, dict):
                raise UserError(f"{at}: each message must be an object with 'from' and 'value'")
            role, text = field(msg, "from", at), field(msg, "value", at)
            if role == "system":
                system = text
            elif role in USER_ROLES or role in ASSISTANT_ROLES:
                out.append((USER_ROLES.get(role) or ASSISTANT_ROLES[role], text))
            else:
                raise UserError(f"{at}: unknown role {role!r}; use one of "
                                f"{', '.join(['system', *USER_ROLES, *ASSISTANT_ROLES])}")
        if not any(role == "assistant" for role, _ in out):
            raise UserError(f"{where}: the conversation has no assistant ('gpt') turn to learn from")
        return system, out
    if "instruction" in row or "output" in row:
        user = alpaca_user(field(row, "instruction", where), field(row, "input", where, required=False))
        return system, [("user", user), ("assistant", field(row, "output", where))]
    if "text" in row:
        return None, [("text", field(row, "text", where))]
    raise UserError(f"{where}: a row needs 'instruction' and 'output' (Alpaca), 'conversations' (ShareGPT) "
                    f"or 'text'; found keys {sorted(row)}")


@dataclass
class Example:
    tokens: list  # every token id of the rendered row, EOS included
    trained: list  # per token: is it a target the loss sees?
    prompt: list  # token ids of the first prompt (before the first response), for generation
    reference: str  # the first response's text, for exact-match scoring


def encode(template, system, dialogue, train_on_prompt=False, mask_history=False, where="row") -> Example:
    """A row's tokens, its loss mask, and (for exact-match scoring) its first prompt and answer."""
    if dialogue[0][0] == "text":
        tok, text = template.tokenizer, dialogue[0][1]
        ids = tok.bos + tok.encode(text) + [tok.eos_id]
        return Example(ids, [False] * len(tok.bos) + [True] * (len(ids) - len(tok.bos)), [], text)
    tokens, trained = template.encode(system, dialogue, train_on_prompt, mask_history, where)
    first = next(i for i, (role, _) in enumerate(dialogue) if role == "assistant")
    return Example(tokens, trained, template.prompt(system, dialogue[:first], where), dialogue[first][1])


def load_examples(path, template, max_seq_len, train_on_prompt=False, mask_history=False, log=print):
    """Read and tokenize a file. Rows longer than max_seq_len (+1 for the shifted target) are cut;
    rows that are left with nothing to learn from are dropped; both are counted in the log."""
    examples, cut, dropped = [], 0, 0
    for where, row in read_rows(path):
        system, dialogue = turns(row, where)
        ex = encode(template, system, dialogue, train_on_prompt, mask_history, where)
        if len(ex.tokens) > max_seq_len + 1:
            ex.tokens, ex.trained, cut = ex.tokens[:max_seq_len + 1], ex.trained[:max_seq_len + 1], cut + 1
        if not any(ex.trained[1:]):
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise UserError(f"{path}: every row is empty after cutting to --max-seq-len {max_seq_len}; "
                        "no response token is left to learn from (raise --max-seq-len)")
    log(f"data: {len(examples)} rows from {path}; {cut} cut to --max-seq-len {max_seq_len}, "
        f"{dropped} dropped with no response token left")
    return examples


def collate(examples, pad_id):
    """Right-padded (B, T) input_ids and labels, with labels[:, t] the target after input_ids[:, t]."""
    T = max(len(ex.tokens) for ex in examples) - 1
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.tokens) - 1
        input_ids[i, :n] = torch.tensor(ex.tokens[:-1])
        labels[i, :n] = torch.tensor([t if keep else IGNORE for t, keep in zip(ex.tokens[1:], ex.trained[1:])])
    return input_ids, labels


class Batches:
    """The data order as a pure function of (seed, step): what optimizer step s reads never depends on
    what ran before, so a resumed run reads exactly what the uninterrupted one would have.

    Each epoch is a seeded permutation cut into global batches of micro_batch * grad_accum * world_size
    rows (the incomplete tail is skipped). Rank r takes the r-th contiguous slice of each global
    batch and cuts it into grad_accum micro-batches, so ranks read disjoint shards and one process
    with world_size times the accumulation reads the very same rows."""

    def __init__(self, examples, micro_batch, grad_accum, world_size=1, rank=0, seed=0, pad_id=0):
        self.examples, self.micro_batch, self.grad_accum = examples, micro_batch, grad_accum
        self.world_size, self.rank, self.seed, self.pad_id = world_size, rank, seed, pad_id
        self.global_batch = micro_batch * grad_accum * world_size
        self.steps_per_epoch = len(examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(examples)} training rows cannot fill one global batch of {self.global_batch} "
                            f"(--batch-size {micro_batch} x --grad-accum {grad_accum} x {world_size} processes); "
                            "lower one of them or add data")

    def global_rows(self, step):
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.examples[i] for i in order[index * self.global_batch:(index + 1) * self.global_batch]]

    def step(self, step):
        """(micro-batches for this rank, number of trained tokens in the whole global batch)."""
        rows = self.global_rows(step)
        n_tokens = sum(sum(ex.trained[1:]) for ex in rows)
        per_rank = self.micro_batch * self.grad_accum
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        micro = [collate(mine[i:i + self.micro_batch], self.pad_id) for i in range(0, per_rank, self.micro_batch)]
        return micro, n_tokens


def split(examples, val_fraction, seed):
    """A seeded held-out split: (train, val)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(examples) * val_fraction)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def show(example, tokenizer, color: bool) -> str:
    """A row as the model receives it, the tokens the loss sees marked: green on a terminal, else
    [[in brackets]]; then the counts. Token 0 is never a target (nothing comes before it)."""
    text, run, seen = "", [], None
    for i, token in enumerate(example.tokens):
        target = i > 0 and example.trained[i]
        if target != seen and run:
            text += mark(tokenizer.decode(run, keep_special=True), seen, color)
            run = []
        run.append(token)
        seen = target
    text += mark(tokenizer.decode(run, keep_special=True), seen, color)
    n = sum(example.trained[1:])
    return f"{text}\n({n} trained tokens, {len(example.tokens) - n} not trained)"


def mark(text, trained, color):
    if not trained:
        return text
    return f"\033[32m{text}\033[0m" if color else f"[[{text}]]"


def main(argv=None):
    p = argparse.ArgumentParser(description="Show rows exactly as train.py builds them: the template's tokens, "
                                "with those the loss sees marked.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (its tokenizer and chat template)")
    p.add_argument("--data", required=True, help="a .json or .jsonl file of rows")
    p.add_argument("--template", default="auto", choices=NAMES, help="as train.py's --template")
    p.add_argument("--max-seq-len", type=int, default=256, help="rows are cut to this many tokens, as in training")
    p.add_argument("--train-on-prompt", action="store_true", help="as train.py's flag")
    p.add_argument("--mask-history", action="store_true", help="as train.py's flag")
    p.add_argument("--show", type=int, default=3, metavar="K", help="how many rows to show")
    p.add_argument("--json", action="store_true", help='one JSON object per row: {"tokens": [...], "trained": [...]}')
    args = p.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.model)
        template = load_template(args.template, args.model, tokenizer)
        rows = load_examples(args.data, template, args.max_seq_len, args.train_on_prompt, args.mask_history,
                             log=lambda line: print(line, file=sys.stderr))
    except UserError as e:
        sys.exit(f"error: {e}")
    for ex in rows[:args.show]:
        if args.json:
            print(json.dumps({"tokens": ex.tokens, "trained": [i > 0 and t for i, t in enumerate(ex.trained)]}))
        else:
            print(show(ex, tokenizer, sys.stdout.isatty()) + "\n")


if __name__ == "__main__":
    main()
