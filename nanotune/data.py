"""Instruction data: read rows, render one prompt template, tokenize, mask, batch.

Row formats (.json array or .jsonl, one object per line):
  Alpaca    {"instruction", "input", "output", optional "system"}
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|..., "value": ...}, ...], optional "system"}
  plain     {"text"}
Every chat row is rendered with one template, each turn as
  "### Instruction:\n{user}\n\n### Response:\n{assistant}{EOS}"
(an Alpaca input adds "\n\n### Input:\n{input}" to the instruction; a system text comes first,
followed by a blank line), after the BOS the model's tokenizer puts before a text, if any. EOS is
the model's own (nanotune.tokenizer). By default only response tokens (and their EOS) are trained on.
"""
import json
import os
from dataclasses import dataclass

import torch

from nanotune import UserError
from nanotune.loss import IGNORE
USER_ROLES = {"human": "user", "user": "user", "observation": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "function_call": "assistant"}


def prompt_text(user: str, system: str = None) -> str:
    """The text before the first response; generation starts right after it."""
    return (f"{system}\n\n" if system else "") + f"### Instruction:\n{user}\n\n### Response:\n"


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


def encode(tokenizer, system, dialogue, train_on_prompt=False) -> Example:
    """Tokenize prompt and response pieces separately, so the loss mask falls exactly on their border."""
    tokens, trained, prompt, reference = list(tokenizer.bos), [False] * len(tokenizer.bos), None, ""
    pending_user = None
    for role, text in dialogue:
        if role == "text":
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            return Example(tokens + ids, trained + [True] * len(ids), [], text)
        if role == "user":
            pending_user = text if pending_user is None else pending_user + "\n\n" + text
            continue
        head = prompt_text(pending_user or "", system if prompt is None else None)
        ids = tokenizer.encode(head)
        if prompt is None:
            prompt, reference = tokens + ids, text
        tokens += ids
        trained += [train_on_prompt] * len(ids)
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        tokens += ids
        trained += [True] * len(ids)
        pending_user = None
    return Example(tokens, trained, prompt, reference)


def load_examples(path, tokenizer, max_seq_len, train_on_prompt=False, log=print):
    """Read and tokenize a file. Rows longer than max_seq_len (+1 for the shifted target) are cut;
    rows that are left with nothing to learn from are dropped; both are counted in the log."""
    examples, cut, dropped = [], 0, 0
    for where, row in read_rows(path):
        system, dialogue = turns(row, where)
        ex = encode(tokenizer, system, dialogue, train_on_prompt)
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
