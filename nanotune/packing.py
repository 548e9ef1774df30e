"""Packing: rows one after another in sequences of --max-seq-len positions, each row seeing only itself.

A padded micro-batch computes every row up to its longest row: on Alpaca-like data (rows of 20-660
tokens, median 140) half the positions of a micro-batch of 8 are padding. A packed sequence holds rows
back to back instead:

    input_ids   a0 a1 a2 a3 b0 b1 c0 c1 c2 pad    a row of n tokens takes n - 1 positions: its last
    labels      a1 a2 a3 a4 b1 b2 c1 c2 c3  -     token is only a target, so no target crosses a row
    positions    0  1  2  3  0  1  0  1  2  0     rotary positions restart at each row
    row_lengths  4           2     3        1     attention stays inside a row (models/base.py, Context);
                                                  the padding is one more row

so each row's loss and gradients are exactly those of the row alone (tests/test_packing.py). Rows are
cut to max_seq_len + 1 tokens when the store is built, so every row fits a sequence.

Which rows share a sequence is a pure function of (seed, epoch), as the order of padded rows is
(data.Batches): a resumed run reads what the uninterrupted one read. Best-fit decreasing (Johnson 1974):
rows longest first, each into the sequence with the least room that still holds it, or a new one. It
fills sequences to ~99% on Alpaca-like data. The rows are shuffled before the (stable) sort by length, so
rows of equal length trade places from epoch to epoch, while the number of sequences depends on the
lengths alone: every epoch has the same number of steps. The sequences are then shuffled.
"""
from bisect import bisect_left, insort

import numpy as np
import torch

from nanotune.loss import IGNORE


def pack(lengths, seq_len, seed):
    """(rows, starts): the packed sequences of rows with these token counts, in a seeded order; sequence s
    holds rows[starts[s]:starts[s + 1]]. lengths (R,) ints, each <= seq_len + 1."""
    g = torch.Generator().manual_seed(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    shuffled = torch.randperm(len(lengths), generator=g).numpy()
    by_length = shuffled[np.argsort(-lengths[shuffled], kind="stable")]  # longest first, ties in seeded order
    sequence = np.empty(len(by_length), dtype=np.int64)  # the sequence each row of by_length goes into
    room = {}  # free positions -> the sequences with exactly that many
    sizes = []  # the keys of room, sorted: bisect finds the tightest fit
    count = 0
    for i, need in enumerate((lengths[by_length] - 1).tolist()):
        j = bisect_left(sizes, need)
        if j == len(sizes):  # fits nowhere: a new sequence
            s, left, count = count, seq_len - need, count + 1
        else:
            free = sizes[j]
            s, left = room[free].pop(), free - need
            if not room[free]:
                del room[free], sizes[j]
        sequence[i] = s
        if left:
            if left not in room:
                room[left] = []
                insort(sizes, left)
            room[left].append(s)
    place = torch.randperm(count, generator=g).numpy()[sequence]  # each row's sequence, in reading order
    order = np.argsort(place, kind="stable")
    starts = np.concatenate(([0], np.cumsum(np.bincount(place, minlength=count))))
    return by_length[order], starts


def collate_packed(sequences, seq_len, pad_id):
    """(B, seq_len) input_ids, labels and positions of B sequences, each a list of rows (data.Example,
    tokens and trained as lists or arrays), and (R,) row_lengths: every sequence's rows and padding,
    one sequence after another (summing to B * seq_len). See the picture above. The lengths are
    counted here, on the host, once per batch, so attention never copies them back from a GPU."""
    B = len(sequences)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE, dtype=np.int64)
    positions = np.zeros((B, seq_len), dtype=np.int64)
    row_lengths = []
    for b, rows in enumerate(sequences):
        t = 0
        for ex in rows:
            tokens, trained = np.asarray(ex.tokens), np.asarray(ex.trained, dtype=bool)
            n = len(tokens) - 1
            input_ids[b, t:t + n] = tokens[:-1]
            labels[b, t:t + n] = np.where(trained[1:], tokens[1:], IGNORE)
            positions[b, t:t + n] = np.arange(n)
            row_lengths += [n] if n else []
            t += n
        row_lengths += [seq_len - t] if t < seq_len else []  # the padding after the last row
    return (*(torch.from_numpy(a) for a in (input_ids, labels, positions)), torch.tensor(row_lengths))
