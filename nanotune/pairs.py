"""Preference pairs as training data: a view of a store of pairs, their micro-batches, and the reference.

A store built with pairs=True (nanotune.store) holds each pair as two consecutive rows, chosen then
rejected, each exactly the SFT row of its conversation trained on the final answer. Pairs shows them a
pair at a time, so Batches (nanotune.data) reads pairs as it reads rows: the same seeded order, the same
split over micro-batches and processes. A micro-batch of P pairs is one forward of 2P rows, each pair's
chosen row followed by its rejected one:

    input_ids, labels  (2P, T)   rows c0 r0 c1 r1 ..., right-padded
    reference          (2P,)     the reference's summed log-probs of the same rows, in that order (dpo and ipo)

With --packing, the rows of a micro-batch's pairs go back to back into sequences of 2 x --max-seq-len
positions (nanotune.packing; a pair always fits one), each row attending only to itself:

    input_ids, labels, positions  (S, 2 x max_seq_len)
    row_lengths                   (R,)      c0 r0 c1 r1 ... and each sequence's padding, in order
    reference                     (2P,)

The reference is the model training starts from (the base, or the base with --adapter; a full fine-tune's
starting weights). Its log-probs are computed once, before step 1, with dropout off, and kept with the
pairs (attach_reference): no second model is held and no step runs a second forward. A resumed run
reads them from OUT/reference.safetensors instead, since its model has moved on.
"""
import math
import os

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from nanotune import UserError
from nanotune.data import Batches, Example, collate, encode, pair_turns, rows_at
from nanotune.packing import collate_packed
from nanotune.distributed import all_reduce_sum
from nanotune.objectives import FIGURES, row_logps


class Pairs:
    """A view of a pair store (nanotune.store.Store with rows 2i, 2i + 1 = pair i's chosen, rejected):
    index says which pairs; reference (pairs, 2) the reference log-probs once attached."""

    def __init__(self, store, index=None, reference=None):
        self.store, self.reference = store, reference
        self.index = np.arange(len(store) // 2) if index is None else np.asarray(index, dtype=np.int64)
        self.targets = store.targets[2 * self.index]  # (pairs,) the chosen answers' tokens: ORPO's SFT term's count
        # (pairs,) what packing counts: a pair takes the positions of both rows, (lc - 1) + (lr - 1)
        self.lengths = store.lengths[2 * self.index] + store.lengths[2 * self.index + 1] - 1

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        """(chosen, rejected) Examples of the i-th pair."""
        return self.store[2 * int(self.index[i])], self.store[2 * int(self.index[i]) + 1]

    def subset(self, index):
        return Pairs(self.store, self.index[index], None if self.reference is None else self.reference[index])

    def collate(self, positions, pad_id, seq_len=None):
        """The micro-batch of the pairs at these positions (see the picture above); seq_len: packed, positions
        then a list of sequences, each a list of positions."""
        if seq_len is None:
            batch = collate([row for i in positions for row in self[int(i)]], pad_id)
        else:
            batch = collate_packed([[row for i in sequence for row in self[int(i)]] for sequence in positions],
                                   seq_len, pad_id)
            positions = np.concatenate(positions)
        if self.reference is None:
            return batch
        return (*batch, torch.from_numpy(self.reference[np.asarray(positions)].reshape(-1)))  # (P, 2) -> c0 r0 c1 ...

    def scored(self, k, template):
        """Up to k pairs as exact-match rows: the prompt, and the chosen answer as the reference."""
        store, found = self.store, []
        sources = store.arrays["source"][store.index[2 * self.index[:k]]].tolist()
        for row in rows_at(store.data, sources):
            (system, dialogue, where), _ = pair_turns(row, f"{store.data} (read again)")
            ex = encode(template, system, dialogue, mask_history=True, where=where)
            found.append(Example(ex.tokens, ex.trained, template.prompt(system, dialogue[:-1], where), dialogue[-1][1]))
        return found


class PairBatches(Batches):
    """Batches (nanotune.data) whose unit is a pair: --batch-size pairs per micro-batch, 2x as many rows; with
    seq_len (--packing: 2 x --max-seq-len) a sequence packed with pairs."""

    def collate(self, units):
        if self.seq_len is None:
            return self.rows.collate([int(unit[0]) for unit in units], self.pad_id)
        return self.rows.collate([unit.tolist() for unit in units], self.pad_id, self.seq_len)

    def pairs(self, step):
        """How many pairs the global batch of `step` holds, the pair losses' divisor: global_batch, or with
        packing the pairs in its sequences."""
        return sum(len(unit) for unit in self.global_rows(step))


def passes(model, pairs, batch_size, pad_id, world):
    """Yield (positions, micro-batch) over this rank's strided share of the pairs, the model in eval mode
    (no dropout). Every rank runs as many micro-batches (under FSDP each forward is a collective): a short
    share repeats a micro-batch, with positions empty, whose results the caller drops."""
    model.eval()
    mine = list(range(world.rank, len(pairs), world.size))
    for i in range(0, math.ceil(len(pairs) / world.size), batch_size):
        positions = mine[i:i + batch_size]
        yield positions, tuple(t.to(world.device) for t in pairs.collate(positions or [0], pad_id))
    model.train()


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # under --compile: a no-grad forward would compile the blocks again
def attach_reference(model, pairs, batch_size, pad_id, world, precision):
    """pairs.reference (pairs, 2) float32: the starting model's summed log-probs of each chosen and rejected."""
    total = np.zeros((len(pairs), 2))
    pairs.reference = None  # micro-batches of the rows alone
    for positions, (input_ids, labels) in passes(model, pairs, batch_size, pad_id, world):
        with precision.context(world.device):
            logps = row_logps(model, input_ids, labels)[0].float().cpu().numpy()
        if positions:
            total[positions] = logps.reshape(-1, 2)  # (2P,) c0 r0 c1 r1 ... -> (P, 2)
    pairs.reference = np.asarray(all_reduce_sum(total.flatten().tolist()), dtype=np.float32).reshape(-1, 2)


@torch.no_grad()
def evaluate_pairs(model, pairs, objective, batch_size, pad_id, world, precision):
    """The objective's loss and figures over all held-out pairs: eval_loss, eval_rewards_chosen, ..."""
    n_tokens = int(pairs.targets.sum())
    sums = dict.fromkeys(("loss", *FIGURES), 0.0)
    for positions, batch in passes(model, pairs, batch_size, pad_id, world):
        with precision.context(world.device):
            loss, figures = objective(model, batch, n_tokens, len(pairs))
        if positions:
            for key, value in {"loss": float(loss), **figures}.items():
                sums[key] += value
    return {f"eval_{key}": value for key, value in zip(sums, all_reduce_sum(list(sums.values())))}


def save_reference(path, train, val):
    save_file({"train": train.reference, **({"val": val.reference} if val else {})}, path)


def load_reference(path, train, val):
    if not os.path.exists(path):
        raise UserError(f"--resume: {path} is missing: it holds the reference log-probs the run computed before "
                        "step 1, which a resumed run cannot compute again (its model has moved on); copy it beside "
                        "the checkpoints, or train again from step 0")
    saved = load_file(path)
    train.reference = saved["train"]
    if val:
        val.reference = saved["val"]
