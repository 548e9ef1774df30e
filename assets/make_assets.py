"""Build nanotune's default assets: a tiny GPT-NeoX base model, an instruction dataset and preference pairs.

Everything here is made from scratch, with no third-party text or weights, and is seeded: run
`python assets/make_assets.py` to rebuild assets/tiny-neox/ and assets/data/ (about 6 minutes on
2 CPU cores). Data and tokenizer come out byte-identical; the weights only with the same torch
version and thread count, as float sums are ordered differently otherwise.

Design. A fine-tuning demo should visibly learn within a minute or two on a laptop CPU. Teaching
a tiny model a brand-new skill takes far longer than that, so the skill is put in at pre-training
and the fine-tune teaches the *format*, which is largely what instruction tuning does for real:

  * Pre-training documents apply five word-list operations (reverse, sort, uppercase, count,
    last word) in terse notations ("reverse: cat dog sun -> sun dog cat", "len(cat dog sun) = three")
    and as English questions ("Q: Sort the words dog cat sun.\nA: cat dog sun"). Several surface
    forms per operation make the base model learn the operation, not one string pattern.
  * The instruction data asks for the same operations with other wordings, under the Alpaca
    template ("### Instruction:\nReverse the order of these words.\n\n### Input:\n..."),
    which the base model has never seen: before fine-tuning it scores 0% exact match (it
    answers "A: ..." or rambles on). A LoRA on the attention projections alone then only has
    to map the new format onto a known skill, and reaches ~90% after three epochs.

Steps: (a) generate the corpus and the dataset, (b) train a byte-level BPE tokenizer on them,
(c) pre-train a ~1M-parameter GPT-NeoX from random init, (d) save everything.
"""
import json
import math
import os
import random
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root, so `python assets/make_assets.py` finds nanotune
from nanotune.generate import generate  # noqa: E402
from nanotune.models import save_pretrained  # noqa: E402
from nanotune.models.gpt_neox import Config, GPTNeoX  # noqa: E402

SEED = 1234
WORDS = ("ant bee cat cow dog elk fox hen owl pig rat yak apple bread cake corn egg fig grape "
         "honey lemon melon nut pear plum rice soup tea").split()
NUMBERS = "zero one two three four five six seven eight nine".split()


def random_words(rng):
    """3-6 distinct words, never already sorted (so copying the input is never a right answer)."""
    while True:
        words = rng.sample(WORDS, rng.randint(3, 6))
        if words != sorted(words):
            return words


# Each operation maps a word list to its answer (a string).
OPS = {
    "reverse": lambda w: " ".join(reversed(w)),
    "sort": lambda w: " ".join(sorted(w)),
    "upper": lambda w: " ".join(x.upper() for x in w),
    "count": lambda w: NUMBERS[len(w)],
    "last": lambda w: w[-1],
}

# Pre-training text states each operation in two families of surface forms, {x} the input, {y} the
# answer. Terse notations teach the operation itself; English questions ("Q: ... A: ...") give the
# words an instruction uses ("reverse", "alphabetical", "capital") a meaning in the base model.
# Some notations put the answer at the start of a line, because byte-level BPE gives a word a
# different token there ("cat") than after a space (" cat"), and the template puts answers there.
NOTATIONS = {
    "reverse": ["reverse: {x} -> {y}", "backwards({x}) = {y}", "reverse\n{x}\n=>\n{y}",
                "Q: Reverse the words {x}.\nA: {y}", "Q: What is {x} written backwards?\nA: {y}"],
    "sort": ["sort: {x} -> {y}", "alphabetical({x}) = {y}", "sort\n{x}\n=>\n{y}",
             "Q: Sort the words {x}.\nA: {y}", "Q: What is {x} in alphabetical order?\nA: {y}"],
    "upper": ["upper: {x} -> {y}", "caps({x}) = {y}", "upper\n{x}\n=>\n{y}",
              "Q: Write {x} in uppercase.\nA: {y}", "Q: What is {x} in capital letters?\nA: {y}"],
    "count": ["count: {x} -> {y}", "len({x}) = {y}", "count\n{x}\n=>\n{y}",
              "Q: Count the words in {x}.\nA: {y}", "Q: How many words does {x} have?\nA: {y}"],
    "last": ["last: {x} -> {y}", "last({x}) = {y}", "last\n{x}\n=>\n{y}",
             "Q: What is the last word of {x}?\nA: {y}", "Q: Which word comes last in {x}?\nA: {y}"],
}

# Instruction wordings, none of them seen in pre-training, and the input on its own line:
# the fine-tune learns this format, the Alpaca template, and the end-of-answer EOS.
INSTRUCTIONS = {
    "reverse": ["Reverse the order of these words.", "Write the words backwards, last one first."],
    "sort": ["Sort these words alphabetically.", "Put the words in alphabetical order."],
    "upper": ["Convert the words to uppercase.", "Write each word in capital letters."],
    "count": ["How many words are there?", "Count the words and answer with a number word."],
    "last": ["What is the last word?", "Give only the final word of the list."],
}


def make_corpus(rng, n_docs):
    docs = []
    for _ in range(n_docs):
        op = rng.choice(list(OPS))
        words = random_words(rng)
        docs.append(rng.choice(NOTATIONS[op]).format(x=" ".join(words), y=OPS[op](words)))
    return docs


def make_dataset(rng, n_rows):
    rows = []
    for i in range(n_rows):
        op = list(OPS)[i % len(OPS)]  # balanced across operations
        words = random_words(rng)
        rows.append({"instruction": rng.choice(INSTRUCTIONS[op]), "input": " ".join(words), "output": OPS[op](words)})
    rng.shuffle(rows)
    return rows


# For preference training (train.py --objective dpo): per operation, a plausible wrong answer, the one a
# model that half-learned the task gives: the words as they came, the order backwards, one word off.
WRONG = {
    "reverse": lambda w: " ".join(w),
    "sort": lambda w: " ".join(sorted(w, reverse=True)),
    "upper": lambda w: " ".join(w),
    "count": lambda w: NUMBERS[len(w) - 1],
    "last": lambda w: w[0],
}


def make_pairs(rng, n_pairs):
    """LLaMA-Factory's Alpaca pairs: the same instructions as the dataset, chosen right, rejected WRONG."""
    pairs = []
    for i in range(n_pairs):
        op = list(OPS)[i % len(OPS)]
        words = random_words(rng)
        pairs.append({"instruction": rng.choice(INSTRUCTIONS[op]), "input": " ".join(words),
                      "chosen": OPS[op](words), "rejected": WRONG[op](words)})
    rng.shuffle(pairs)
    return pairs


def write_pairs():
    """assets/data/pairs.jsonl, from a seed of its own: the other assets stay as they were."""
    with open(os.path.join(HERE, "data", "pairs.jsonl"), "w") as f:
        for row in make_pairs(random.Random(SEED + 1), 1000):
            f.write(json.dumps(row) + "\n")


def render(row):
    """The trainer's Alpaca template (nanotune/data.py renders the same); used only to train the tokenizer."""
    return (f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n"
            f"### Response:\n{row['output']}<|endoftext|>")


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE like Pythia's: any string round-trips exactly, ids 0 and 1 are the specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def init_weights(model):
    """GPT-2 style: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * layers)
    so the residual stream's variance does not grow with depth; biases zero, LayerNorms identity."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.constant_(p, 1.0 if "layernorm" in name or "layer_norm" in name else 0.0)
        else:
            std = 0.02
            if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
                std /= math.sqrt(2 * model.config.num_hidden_layers)
            torch.nn.init.normal_(p, std=std)


def pretrain(model, stream, steps, batch, seq, lr, warmup, rng):
    """Next-token prediction on random windows of the token stream; AdamW with warmup + cosine decay."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on biases and norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    start = time.time()
    for step in range(1, steps + 1):
        progress = max(0.0, (step - warmup) / (steps - warmup))  # linear warm-up, then cosine to lr / 10
        scale = step / warmup if step <= warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        at = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        window = torch.stack([stream[i:i + seq + 1] for i in at.tolist()])
        loss = model.loss_sum(window[:, :-1], window[:, 1:]) / (batch * seq)  # labels: inputs shifted by one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == 1:
            print(f"  step {step:5d}/{steps}  loss {loss.item():.4f}  lr {lr * scale:.2e}  {time.time() - start:.0f}s",
                  flush=True)


def main():
    torch.manual_seed(SEED)
    rng = random.Random(SEED)

    corpus = make_corpus(rng, 120_000)
    rows = make_dataset(rng, 2000)
    print(f"corpus: {len(corpus)} documents; dataset: {len(rows)} rows")

    # The tokenizer also sees the rendered instruction rows, so the template's words get tokens of
    # their own and fine-tuning sequences stay short. The base model itself never trains on them.
    tok = train_tokenizer(corpus + [render(r) for r in rows], vocab_size=640)
    print(f"tokenizer: {tok.get_vocab_size()} tokens")

    eos = tok.token_to_id("<|endoftext|>")
    ids = []
    for enc in tok.encode_batch(corpus):
        ids.extend(enc.ids + [eos])  # documents separated by EOS, so the model learns to stop
    stream = torch.tensor(ids, dtype=torch.long)
    print(f"pre-training stream: {len(stream):,} tokens")

    config = Config(vocab_size=-(-tok.get_vocab_size() // 64) * 64, hidden_size=128, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=512, rotary_pct=0.25, max_position_embeddings=512,
                    use_parallel_residual=True, bos_token_id=eos, eos_token_id=eos)
    model = GPTNeoX(config)
    init_weights(model)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    pretrain(model, stream, steps=1200, batch=32, seq=128, lr=3e-3, warmup=100, rng=rng)

    out = os.path.join(HERE, "tiny-neox")
    save_pretrained(model, out)
    tok.save(os.path.join(out, "tokenizer.json"))  # save_pretrained copies a tokenizer only from a source folder
    os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
    with open(os.path.join(HERE, "data", "train.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    write_pairs()
    print(f"saved {out}, {os.path.join(HERE, 'data', 'train.jsonl')} and pairs.jsonl")

    # What the base model can and cannot do: the skill in its own notations, not yet the template.
    model.eval()
    template = render(rows[0]).split("### Response:\n")[0] + "### Response:\n"
    for prompt in ("reverse: owl cat fig ->", "Q: How many words does egg tea nut rice have?\nA:", template):
        print(f"  {prompt!r} -> {tok.decode(generate(model, [tok.encode(prompt).ids], 12, eos=eos)[0])!r}")


if __name__ == "__main__":
    main()
