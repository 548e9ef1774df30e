"""Instruction data: read rows, render them with the model's chat template, mask, batch.

Row formats (.json array or .jsonl, one object per line):
  Alpaca    {"instruction", "input", "output", optional "system"}
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|..., "value": ...}, ...], optional "system"}
  plain     {"text"}
Preference pairs (--objective dpo, ipo, simpo, orpo; see pair_turns):
  TRL       {"prompt", "chosen", "rejected"}: strings, or messages [{"role", "content"}, ...]
  Alpaca    {"instruction", "input", "chosen", "rejected"} (LLaMA-Factory)
  ShareGPT  {"conversations", "chosen": {"from": "gpt", "value"}, "rejected": {...}} (LLaMA-Factory)
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

import numpy as np
import torch

from nanotune import UserError
from nanotune.loss import IGNORE
from nanotune.packing import collate_packed, pack
from nanotune.templates import NAMES, load_template
from nanotune.tokenizer import load_tokenizer
USER_ROLES = {"human": "user", "user": "user", "observation": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "function_call": "assistant"}


def alpaca_user(instruction: str, input_text: str = "") -> str:
    """An Alpaca row's user turn: the instruction, then its input section when there is one."""
    return instruction + (f"\n\n### Input:\n{input_text}" if input_text else "")


def read_rows(path: str):
    """Yield (where, source, row): where = 'file line N' (.jsonl) or 'file row N' (.json array), source = the
    row's byte offset in a .jsonl or its index in a .json array (rows_at reads it again). A .jsonl is read
    line by line, never whole; a .json array is parsed whole (big data belongs in .jsonl)."""
    check_file(path)
    if path.endswith(".jsonl"):
        yield from read_jsonl(path)
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"data file {path} is empty")
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
        yield f"{path} row {i}", i - 1, row


def check_file(path: str):
    if not os.path.isfile(path):
        problem = "is a folder" if os.path.isdir(path) else "does not exist"
        raise UserError(f"data file {path!r} {problem}; pass --data a .json or .jsonl file")


def read_jsonl(path: str):
    empty, offset = True, 0
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {offset + e.start}); "
                                "save it as UTF-8") from None
            if text.strip():
                try:
                    yield f"{path} line {i}", offset, json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {i} is not valid JSON ({e.msg})") from None
                empty = False
            offset += len(line)
    if empty:
        raise UserError(f"data file {path} is empty")


def rows_at(path: str, sources) -> list:
    """The rows read_rows yielded with these sources, read again: a seek per row of a .jsonl (a .json
    array is parsed again)."""
    with open(path, "rb") as f:
        if not path.endswith(".jsonl"):
            rows = json.load(f)
            return [rows[i] for i in sources]
        found = []
        for offset in sources:
            f.seek(offset)
            found.append(json.loads(f.readline()))
        return found


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
    if "chosen" in row or "rejected" in row:
        raise UserError(f"{where}: a preference pair (chosen/rejected) cannot train --objective sft; pass --objective "
                        "dpo, ipo, simpo or orpo, or give rows with an answer ('output' or 'conversations')")
    system = field(row, "system", where, required=False) or None
    if "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list) or not conv:
            raise UserError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
        system, out = messages(conv, system, f"{where} conversations")
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


def messages(conv, system, where, role_key="from", text_key="value"):
    """ShareGPT {from, value} (or TRL's {role, content}) messages -> (system, [(role, text), ...])."""
    out = []
    for j, msg in enumerate(conv):
        at = f"{where}[{j}]"
        if not isinstance(msg, dict):
            raise UserError(f"{at}: each message must be an object with {role_key!r} and {text_key!r}")
        role, text = field(msg, role_key, at), field(msg, text_key, at)
        if role == "system":
            system = text
        elif role in USER_ROLES or role in ASSISTANT_ROLES:
            out.append((USER_ROLES.get(role) or ASSISTANT_ROLES[role], text))
        else:
            raise UserError(f"{at}: unknown role {role!r}; use one of "
                            f"{', '.join(['system', *USER_ROLES, *ASSISTANT_ROLES])}")
    return system, out


def pair_turns(row, where: str):
    """A preference row -> two (system, dialogue, where): the conversation ending in the chosen answer, then
    in the rejected one. Each is exactly the SFT row of that conversation; the pair trains on the final
    answer alone (encode with mask_history: earlier assistant turns of the prompt are context)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: each row must be a JSON object, not {type(row).__name__}")
    if "chosen" not in row or "rejected" not in row:
        missing = "'chosen'" if "chosen" not in row else "'rejected'"
        raise UserError(f"{where}: a preference pair needs 'chosen' and 'rejected', and {missing} is missing"
                        + ("; this is an SFT row, which trains with --objective sft" if "chosen" not in row and
                           "rejected" not in row else ""))
    system, prompt = prompt_dialogue(row, where)
    if prompt is None:
        raise UserError(f"{where}: a preference pair needs its prompt as 'prompt' (TRL), 'instruction' or "
                        f"'conversations' (LLaMA-Factory); found keys {sorted(row)}")
    if not prompt or prompt[-1][0] != "user":
        raise UserError(f"{where}: the prompt must end with a user turn, which the chosen and rejected answers answer")
    return [(system, prompt + [("assistant", completion(row[key], f"{where} {key}"))], where)
            for key in ("chosen", "rejected")]


def prompt_dialogue(row, where: str):
    """(system, [(role, text), ...]) of a row's prompt, for the objectives that train on answers to it:
    TRL's 'prompt' (a string, one user turn, or {role, content} messages), ShareGPT's 'conversations',
    or Alpaca's 'instruction' (and 'input'); the dialogue is None when the row has none of these."""
    system = field(row, "system", where, required=False) or None
    if "prompt" in row:
        if isinstance(row["prompt"], list):
            return messages(row["prompt"], system, f"{where} prompt", "role", "content")
        return system, [("user", field(row, "prompt", where))]
    if "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list) or not conv:
            raise UserError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
        return messages(conv, system, f"{where} conversations")
    if "instruction" in row:
        return system, [("user", alpaca_user(field(row, "instruction", where), field(row, "input", where,
                                                                                       required=False)))]
    return system, None


def completion(value, where):
    """The answer text of a pair's 'chosen' or 'rejected': a string, one {from, value} / {role, content}
    assistant message, or a list holding that one message."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        keys = ("role", "content") if "role" in value else ("from", "value")
        _, turns = messages([value], None, where, *keys)
        if not turns or turns[0][0] != "assistant":
            raise UserError(f"{where}: the completion must be an assistant message, not {value.get(keys[0])!r}")
        value = turns[0][1]
    if not isinstance(value, str):
        raise UserError(f"{where}: the completion must be a string or one assistant message, "
                        f"not {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: the completion is empty; remove the pair or give it an answer")
    return value


@dataclass
class Example:
    tokens: list  # every token id of the rendered row, EOS included
    trained: list  # per token: is it a target the loss sees?
    prompt: list  # token ids of the first prompt (before the first response), for generation
    reference: str  # the first response's text, for exact-match scoring


def encode(template, system, dialogue, train_on_prompt=False, mask_history=False, where="row") -> Example:
    """A row's tokens, its loss mask, and (for exact-match scoring) its first prompt and answer."""
    tokens, trained = encode_rows(template, [(system, dialogue, where)], train_on_prompt, mask_history)[0]
    if dialogue[0][0] == "text":
        return Example(tokens, trained, [], dialogue[0][1])
    first = next(i for i, (role, _) in enumerate(dialogue) if role == "assistant")
    return Example(tokens, trained, template.prompt(system, dialogue[:first], where), dialogue[first][1])


def encode_rows(template, rows, train_on_prompt=False, mask_history=False) -> list:
    """[(system, dialogue, where)] from turns() -> [(tokens, trained)], the texts of all rows tokenized in
    one call (Template.encode_batch). A plain-text row is BOS + text + EOS, trained on all but BOS."""
    tok = template.tokenizer
    plain = [i for i, (_, dialogue, _) in enumerate(rows) if dialogue[0][0] == "text"]
    chat = [i for i, (_, dialogue, _) in enumerate(rows) if dialogue[0][0] != "text"]
    out = [None] * len(rows)
    for i, ids in zip(plain, tok.encode_batch([rows[i][1][0][1] for i in plain])):
        ids = tok.bos + ids + [tok.eos_id]
        out[i] = ids, [False] * len(tok.bos) + [True] * (len(ids) - len(tok.bos))
    for i, encoded in zip(chat, template.encode_batch([rows[i] for i in chat], train_on_prompt, mask_history)):
        out[i] = encoded
    return out


def cut(tokens, trained, max_seq_len):
    """A row cut to max_seq_len inputs (+1 for the shifted target), and whether it was cut."""
    if len(tokens) > max_seq_len + 1:
        return tokens[:max_seq_len + 1], trained[:max_seq_len + 1], True
    return tokens, trained, False


def load_examples(path, template, max_seq_len, train_on_prompt=False, mask_history=False, log=print, pairs=False):
    """Read and tokenize a file, one row at a time (the store, nanotune.store, does it in batches). Rows
    longer than max_seq_len (+1 for the shifted target) are cut; rows that are left with nothing to learn
    from are dropped; both are counted in the log. pairs: preference rows, each giving its chosen and then
    its rejected Example (pair_rows), a pair dropped when either is left with no answer token."""
    examples, n_cut, dropped = [], 0, 0
    for where, _, row in read_rows(path):
        group = []
        for system, dialogue, _ in pair_turns(row, where) if pairs else [(*turns(row, where), where)]:
            ex = encode(template, system, dialogue, train_on_prompt and not pairs, mask_history or pairs, where)
            ex.tokens, ex.trained, was_cut = cut(ex.tokens, ex.trained, max_seq_len)
            n_cut += was_cut
            group.append(ex)
        if not all(any(ex.trained[1:]) for ex in group):
            dropped += 1
            continue
        examples += group
    if not examples:
        raise all_empty(path, max_seq_len)
    log(f"data: {len(examples) // (1 + pairs)} {'pairs' if pairs else 'rows'} from {path}; {n_cut} cut to "
        f"--max-seq-len {max_seq_len}, {dropped} dropped with no response token left")
    return examples


def all_empty(path, max_seq_len):
    return UserError(f"{path}: every row is empty after cutting to --max-seq-len {max_seq_len}; "
                     "no response token is left to learn from (raise --max-seq-len)")


def collate(examples, pad_id):
    """Right-padded (B, T) input_ids and labels, with labels[:, t] the target after input_ids[:, t]."""
    T = max(len(ex.tokens) for ex in examples) - 1
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        tokens, trained = np.asarray(ex.tokens, dtype=np.int64), np.asarray(ex.trained, dtype=bool)
        n = len(tokens) - 1
        input_ids[i, :n] = torch.from_numpy(tokens[:-1])
        labels[i, :n] = torch.from_numpy(np.where(trained[1:], tokens[1:], IGNORE))
    return input_ids, labels


class Batches:
    """The data order as a pure function of (seed, step): what optimizer step s reads never depends on
    what ran before, so a resumed run reads exactly what the uninterrupted one would have.

    rows: a nanotune.store.Store (its rows, their lengths and trained-token counts). The unit of a batch is
    a row, right-padded to the longest of its micro-batch, or with seq_len (--packing) a sequence of seq_len
    positions packed with rows (nanotune.packing). Each epoch is a seeded order of the units, cut into
    global batches of micro_batch * grad_accum * world_size units (the incomplete tail is skipped). Rank r
    takes the r-th contiguous slice of each global batch and cuts it into grad_accum micro-batches, so
    ranks read disjoint shards, equally many units each, and one process with world_size times the
    accumulation reads the very same rows."""

    def __init__(self, rows, micro_batch, grad_accum, world_size=1, rank=0, seed=0, pad_id=0, seq_len=None):
        self.rows, self.micro_batch, self.grad_accum = rows, micro_batch, grad_accum
        self.world_size, self.rank, self.seed, self.pad_id, self.seq_len = world_size, rank, seed, pad_id, seq_len
        self.global_batch = micro_batch * grad_accum * world_size
        self.epoch, self.plan = None, None  # the packing plan of one epoch, kept for its steps
        self.units = len(rows) if seq_len is None else len(self.order(0)[1]) - 1  # the same in every epoch
        self.steps_per_epoch = self.units // self.global_batch
        if self.steps_per_epoch == 0:
            what = "training rows" if seq_len is None else f"packed sequences of {seq_len} tokens"
            raise UserError(f"{self.units} {what} cannot fill one global batch of {self.global_batch} "
                            f"(--batch-size {micro_batch} x --grad-accum {grad_accum} x {world_size} processes); "
                            "lower one of them or add data")

    def order(self, epoch):
        """(rows, starts): the epoch's units in reading order, unit u being rows[starts[u]:starts[u + 1]]."""
        if self.epoch != epoch:  # packing a million rows takes a few seconds
            if self.seq_len is None:
                rows = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))
                self.plan = rows.numpy(), np.arange(len(self.rows) + 1)
            else:
                self.plan = pack(self.rows.lengths, self.seq_len, self.seed + epoch)
            self.epoch = epoch
        return self.plan

    def global_rows(self, step):
        """The units of step's global batch, each an array of row indices (one row, unless packed)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        rows, starts = self.order(epoch)
        units = range(index * self.global_batch, (index + 1) * self.global_batch)
        return [rows[starts[u]:starts[u + 1]] for u in units]

    def step(self, step):
        """(micro-batches for this rank, number of trained tokens in the whole global batch). A micro-batch
        is (input_ids, labels), packed ones also (positions, row_lengths): CausalLM.forward's arguments."""
        units = self.global_rows(step)
        n_tokens = int(sum(self.rows.targets[unit].sum() for unit in units))
        per_rank = self.micro_batch * self.grad_accum
        mine = units[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [self.collate(mine[i:i + self.micro_batch]) for i in range(0, per_rank, self.micro_batch)], n_tokens

    def collate(self, units):
        if self.seq_len is None:
            return collate([self.rows[int(unit[0])] for unit in units], self.pad_id)
        return collate_packed([[self.rows[int(r)] for r in unit] for unit in units], self.seq_len, self.pad_id)


def split(rows, val_fraction, seed):
    """A seeded held-out split of a Store: (train, val), views of the same arrays."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = int(len(rows) * val_fraction)
    return rows.subset(order[n_val:]), rows.subset(order[:n_val])


def show(example, tokenizer, color: bool) -> str:
    """A row as the model receives it, the tokens the loss sees marked: green on a terminal, else
    [[in brackets]]; then the counts. Token 0 is never a target (nothing comes before it)."""
    text, run, seen = "", [], None
    for i, (token, trained) in enumerate(zip(np.asarray(example.tokens).tolist(), example.trained)):
        target = i > 0 and bool(trained)
        if target != seen and run:
            text += mark(tokenizer.decode(run, keep_special=True), seen, color)
            run = []
        run.append(token)
        seen = target
    text += mark(tokenizer.decode(run, keep_special=True), seen, color)
    n = int(np.count_nonzero(example.trained[1:]))
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
        first = next(read_rows(args.data))[2]
        pairs = isinstance(first, dict) and ("chosen" in first or "rejected" in first)  # shown as train.py's
        rows = load_examples(args.data, template, args.max_seq_len, args.train_on_prompt, args.mask_history,
                             log=lambda line: print(line, file=sys.stderr), pairs=pairs)  # --objective dpo reads them
    except UserError as e:
        sys.exit(f"error: {e}")
    for k, ex in enumerate(rows[:args.show * (1 + pairs)]):
        if args.json:
            print(json.dumps({"tokens": ex.tokens, "trained": [i > 0 and t for i, t in enumerate(ex.trained)]}))
        else:
            label = ("chosen:\n", "rejected:\n")[k % 2] if pairs else ""
            print(label + show(ex, tokenizer, sys.stdout.isatty()) + "\n")


if __name__ == "__main__":
    main()
