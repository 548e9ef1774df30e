"""The tokenized store: every row rendered and tokenized once, kept on disk as flat arrays that each
process memory-maps.

Tokenizing is the slow part of a start on real data (100,000 Alpaca rows: ~90 s one row at a time), and
rows held as Python lists of ints and booleans cost 40-50 bytes per token in every process. A store is
built in batches (the tokenizer runs on every core), costs 5 bytes per token on disk, and in memory only
the pages a process reads, shared between the processes of a machine:

    CACHE/<data file name>-<key>/
        tokens.int32    every row's token ids, one row after another
        trained.uint8   per token: 1 where the loss sees it (data.encode's mask)
        offsets.int64   (rows + 1,): row i is tokens[offsets[i]:offsets[i + 1]]
        targets.int32   (rows,): the row's trained targets, trained[1:].sum(), for the loss's normaliser
        source.int64    (rows,): where the row came from (its byte offset in a .jsonl, its index in a .json)
        meta.json       counts, and the recipe the key is a hash of

The key hashes everything that changes what a store holds: the data file's bytes, the model folder's
tokenizer files, its BOS and EOS ids (config.json may give the EOS), the chat template in use (its kind,
and a Jinja template's text), --max-seq-len, --train-on-prompt, --mask-history, whether the rows are
preference pairs (each stored as two rows, chosen then rejected: nanotune.pairs), and FORMAT.
A run with the same inputs maps the store in seconds; a changed input is another key, so another store.

A store is written as checkpoints are: into a temporary folder, every file fsynced, renamed into place;
one whose files lack the sizes its meta.json gives is never used (it is built again). One process builds
while the others wait on a file lock: flock has no timeout, unlike a collective, and the kernel releases
it if the builder dies. Under torchrun that is one builder per node with a local cache folder, one per run
with a shared one; every process then maps the same files.
"""
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time
from array import array
from itertools import islice

import numpy as np

from nanotune import UserError
from nanotune.data import (Example, all_empty, check_file, cut, encode, encode_rows, pair_turns, read_rows, rows_at,
                           turns)

FORMAT = 1  # bump when what a store holds, or how nanotune renders rows, changes
BATCH = 1024  # rows per tokenizer call
# The files nanotune.tokenizer and nanotune.templates read from the model folder for the ids of a row (of
# config.json only the EOS id, which the recipe holds: a store serves every model with this tokenizer).
MODEL_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")
ARRAYS = {"tokens": np.int32, "trained": np.uint8, "offsets": np.int64, "targets": np.int32, "source": np.int64}


def load_store(path, template, model_dir, cache_dir, max_seq_len, train_on_prompt=False, mask_history=False,
               log=print, pairs=False):
    """The Store of a data file, from cache_dir when it is there, else built (and kept) there. pairs:
    preference rows (data.pair_turns), stored as two rows each, chosen then rejected."""
    check_file(path)
    kind = [type(template).__name__, getattr(template, "name", None), getattr(template, "source", None)]
    recipe = {"format": FORMAT, "data": file_hash(path), "template": kind, "max_seq_len": max_seq_len,
              "train_on_prompt": train_on_prompt, "mask_history": mask_history, "pairs": pairs,
              "bos": list(template.tokenizer.bos), "eos": template.tokenizer.eos_id,
              "model files": {name: file_hash(os.path.join(model_dir, name)) for name in MODEL_FILES
                              if os.path.exists(os.path.join(model_dir, name))}}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"{os.path.basename(path)}-{key}")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(folder + ".lock", "a")
    except OSError as e:
        raise UserError(f"cannot write the data cache in {cache_dir} ({e.strerror}); pass --data-cache a folder "
                        "you can write to") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or by the kernel if this process dies
        store = Store.open(folder, path)
        origin = "from cache"
        if store is None:
            if os.path.exists(folder):
                log(f"data: the store {folder} is incomplete or damaged; building it again")
                shutil.rmtree(folder)
            start = time.time()
            build(path, template, max_seq_len, train_on_prompt, mask_history, folder, recipe, pairs)
            store = Store.open(folder, path)
            seconds = time.time() - start
            origin = f"built in {seconds:.1f}s, {store.meta['tokens'] / seconds:,.0f} tokens/s"
    m = store.meta
    log(f"data: {m['rows']:,} rows{' (chosen and rejected of %d pairs)' % (m['rows'] // 2) if pairs else ''}, "
        f"{m['tokens']:,} tokens ({m['targets'] / m['tokens']:.0%} trained) from {path}; "
        f"{m['cut']} cut to --max-seq-len {max_seq_len}, {m['dropped']} dropped with no response token left; "
        f"store {m['bytes'] / 2**20:,.1f} MB in {folder} ({origin})")
    return store


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def build(path, template, max_seq_len, train_on_prompt, mask_history, folder, recipe, pairs=False):
    """Tokenize every row of `path` into the files of `folder`, BATCH rows per tokenizer call; rows are
    cut and dropped as data.load_examples does. Nothing is held but one batch and the per-row arrays.
    A preference row is two rows, chosen then rejected, trained on their final answer only."""
    cache_dir, name = os.path.split(folder)
    for stale in glob.glob(os.path.join(cache_dir, f".{name}.tmp-*")):  # a builder that was killed: only the
        shutil.rmtree(stale, ignore_errors=True)  # lock's holder builds, so no other is writing there
    tmp = os.path.join(cache_dir, f".{name}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    try:
        lengths, targets, sources = array("q"), array("i"), array("q")
        n_cut = dropped = chat = 0
        with open(os.path.join(tmp, "tokens.int32"), "wb") as f_tokens, \
                open(os.path.join(tmp, "trained.uint8"), "wb") as f_trained:
            rows = read_rows(path)
            while batch := list(islice(rows, BATCH)):
                parsed = [turn for where, _, row in batch
                          for turn in (pair_turns(row, where) if pairs else [(*turns(row, where), where)])]
                encoded = encode_rows(template, parsed, train_on_prompt and not pairs, mask_history or pairs)
                group = 2 if pairs else 1  # the store's rows of one data row
                tokens, trained = array("i"), array("B")
                for k, (_, source, _) in enumerate(batch):
                    kept = [cut(ids, mask, max_seq_len) for ids, mask in encoded[group * k:group * (k + 1)]]
                    n_cut += sum(was_cut for _, _, was_cut in kept)
                    if not all(any(mask[1:]) for _, mask, _ in kept):
                        dropped += 1
                        continue
                    for ids, mask, _ in kept:
                        tokens.extend(ids)
                        trained.extend(mask)
                        lengths.append(len(ids))
                        targets.append(sum(mask[1:]))
                        sources.append(source)
                    chat += parsed[group * k][1][0][0] != "text"
                tokens.tofile(f_tokens)
                trained.tofile(f_trained)
        if not lengths:
            raise all_empty(path, max_seq_len)
        offsets = np.concatenate(([0], np.cumsum(np.frombuffer(lengths, dtype=np.int64))))
        for name, values in (("offsets", offsets), ("targets", targets), ("source", sources)):
            np.asarray(values, dtype=ARRAYS[name]).tofile(os.path.join(tmp, f"{name}.{ARRAYS[name].__name__}"))
        meta = {"rows": len(lengths), "tokens": int(offsets[-1]), "targets": int(np.sum(targets)), "cut": n_cut,
                "dropped": dropped, "chat_rows": chat, "recipe": recipe}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, folder)
        directory = os.open(cache_dir or ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Store:
    """Rows as flat arrays, memory-mapped from a store folder (open) or in memory (of), and which of
    them this object shows: `index`, so that a split is two views of the same arrays.

    store[i] is an Example whose tokens and trained are array views (prompt and reference: see scored);
    store.lengths and store.targets give every row's token and trained-target counts at once."""

    def __init__(self, arrays, data=None, meta=None, index=None):
        self.arrays, self.data, self.meta = arrays, data, meta or {}
        self.index = np.arange(len(arrays["targets"])) if index is None else np.asarray(index, dtype=np.int64)
        offsets = arrays["offsets"]
        self.lengths = offsets[self.index + 1] - offsets[self.index]  # (rows,)
        self.targets = np.asarray(arrays["targets"][self.index], dtype=np.int64)  # (rows,)

    @classmethod
    def open(cls, folder, data):
        """The store in `folder`, or None if it is missing or any file has not the size meta.json gives."""
        try:
            with open(os.path.join(folder, "meta.json")) as f:
                meta = json.load(f)
            sizes = {"tokens": meta["tokens"], "trained": meta["tokens"], "offsets": meta["rows"] + 1,
                     "targets": meta["rows"], "source": meta["rows"]}
            files = {name: os.path.join(folder, f"{name}.{dtype.__name__}") for name, dtype in ARRAYS.items()}
            if any(os.path.getsize(files[name]) != sizes[name] * np.dtype(ARRAYS[name]).itemsize for name in ARRAYS):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        meta["bytes"] = sum(os.path.getsize(file) for file in files.values())
        arrays = {name: np.memmap(files[name], dtype=ARRAYS[name], mode="r") for name in ARRAYS}
        return cls(arrays, data, meta)

    @classmethod
    def of(cls, examples):
        """Examples (tokens and trained as lists) as an in-memory store: for tests and small lists."""
        lengths = [len(ex.tokens) for ex in examples]
        arrays = {"tokens": np.concatenate([np.asarray(ex.tokens, dtype=np.int32) for ex in examples]),
                  "trained": np.concatenate([np.asarray(ex.trained, dtype=np.uint8) for ex in examples]),
                  "offsets": np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
                  "targets": np.array([sum(ex.trained[1:]) for ex in examples], dtype=np.int32)}
        return cls(arrays)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i) -> Example:
        row = self.index[i]
        a, b = self.arrays["offsets"][row], self.arrays["offsets"][row + 1]
        return Example(self.arrays["tokens"][a:b], self.arrays["trained"][a:b], None, None)

    def subset(self, index):
        """The rows index (positions in this view) as a new view of the same arrays."""
        return Store(self.arrays, self.data, self.meta, self.index[index])

    def scored(self, k, template):
        """Up to k chat rows with their first prompt and answer, for exact-match scoring. The store keeps
        token ids only, so these few rows are read again from the data file (a seek each in a .jsonl)."""
        found = []
        if not self.data or not self.meta.get("chat_rows"):
            return found
        for start in range(0, len(self), 64):
            sources = self.arrays["source"][self.index[start:start + 64]].tolist()
            for row in rows_at(self.data, sources):
                system, dialogue = turns(row, f"{self.data} (read again)")
                if dialogue[0][0] != "text" and len(found) < k:
                    found.append(encode(template, system, dialogue))
            if len(found) >= k:
                return found
        return found
