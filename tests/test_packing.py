"""Packing (nanotune.packing, models/base.py Context.attend): a packed batch computes exactly what its rows
compute alone, no row sees another, the plan is seeded and full, and ranks read equal shares."""
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_config, train_here
from nanotune.data import Batches, Example, collate, cut
from nanotune.models import MODEL_TYPES
from nanotune.models.base import Context
from nanotune.models.gpt_neox import GPTNeoX
from nanotune.packing import collate_packed, pack
from nanotune.store import Store
from test_chatglm import thudm_config
from test_gemma_phi3 import gemma_config
from test_llama import config_json
from test_resume import losses

T = 16  # positions per packed sequence (--max-seq-len)
FAMILIES = {  # GPT-NeoX; Mistral: grouped-query attention and a sliding window shorter than a row; ChatGLM's rotary;
    # Gemma 2: windows of 4 and soft-capped attention and logits
    "gpt_neox": lambda: GPTNeoX(tiny_config()),
    "mistral": lambda: build(config_json("mistral", num_key_value_heads=2, sliding_window=6)),
    "chatglm": lambda: build(thudm_config(padded_vocab_size=120)),
    "gemma2": lambda: build(gemma_config(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),  # capped
}


def build(hf):
    cls = MODEL_TYPES[hf["model_type"]]
    return cls(cls.config_class.from_hf(hf, "test"))


def rows(vocab, seed=0):
    """One row that fills a sequence exactly (T + 1 tokens: T positions), one cut at the boundary as the
    store cuts it, and short ones; random tokens, random masks (token 0 is never a target)."""
    g = torch.Generator().manual_seed(seed)

    def row(n):
        trained = [False] + (torch.rand(n - 1, generator=g) < 0.7).tolist()
        return Example(torch.randint(3, vocab, (n,), generator=g).tolist(), trained[:-1] + [True], [], "")
    long = row(T + 9)
    tokens, trained, was_cut = cut(long.tokens, long.trained, T)
    assert was_cut and len(tokens) == T + 1
    return [row(T + 1), Example(tokens, trained, [], ""), row(6), row(9), row(4), row(12), row(2)]


def sequences(examples, seed=0):
    order, starts = pack([len(ex.tokens) for ex in examples], T, seed)
    return [[examples[i] for i in order[starts[s]:starts[s + 1]]] for s in range(len(starts) - 1)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("way", ["per row", "masked"])
def test_packed_loss_and_gradients_equal_the_rows_alone(family, way, monkeypatch):
    """The summed loss and every weight's gradient of one packed batch equal the sums over its rows, each
    run alone through the plain (unpacked, unmasked) path, in fp32. Both ways of attending: the CPU's,
    a call per row, and the GPU's, one call with the block-diagonal mask (taken here on the CPU)."""
    if way == "masked":
        monkeypatch.setattr(Context, "packed", Context.masked)
    torch.manual_seed(0)
    model = FAMILIES[family]()
    examples = rows(model.config.vocab_size)
    packed = sequences(examples)
    assert any(len(seq) == 1 for seq in packed) and any(len(seq) > 2 for seq in packed)  # alone, and shared
    reference = 0.0
    for ex in examples:
        reference = reference + model(*collate([ex], pad_id=0))
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(*collate_packed(packed, T, pad_id=0))
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for name, p in model.named_parameters():
        scale = max(1.0, expected[name].abs().max().item())  # Gemma's gradients run larger (its scaled embedding)
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("family", ["gpt_neox", "mistral", "gemma2"])
def test_no_row_sees_another(family):
    """Changing one row's tokens changes the logits of that row only, in the same packed sequence."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    a, b, c = rows(model.config.vocab_size)[2:5]  # 6, 9 and 4 tokens: 5 + 8 + 3 = 16 positions
    b2 = Example(b.tokens[::-1], b.trained, [], "")
    with torch.no_grad():
        logits, again = (model(ids, positions=pos, row_lengths=lengths)
                         for ids, _, pos, lengths in (collate_packed([seq], T, 0) for seq in ([a, b, c], [a, b2, c])))
    assert torch.equal(logits[0, :5], again[0, :5]) and torch.equal(logits[0, 13:], again[0, 13:])
    assert not torch.allclose(logits[0, 5:13], again[0, 5:13])


def test_the_plan_is_seeded_full_and_the_same_size_every_epoch():
    lengths = np.random.default_rng(0).integers(2, 130, size=3000)
    lengths[:5] = 129  # rows of T + 1 tokens fill a sequence alone
    plans = [pack(lengths, 128, seed) for seed in (0, 0, 1)]
    (rows0, starts0), (rows1, starts1), (rows2, starts2) = plans
    assert np.array_equal(rows0, rows1) and np.array_equal(starts0, starts1)  # a pure function of the seed
    assert not np.array_equal(rows0, rows2) and len(starts0) == len(starts2)  # reshuffled, as many sequences
    assert sorted(rows0) == list(range(len(lengths)))  # every row once
    used = np.add.reduceat(lengths[rows0] - 1, starts0[:-1])  # positions each sequence holds
    assert used.max() <= 128 and used.sum() / (128 * len(used)) > 0.97  # rows of up to a whole sequence


def test_packed_batches_give_ranks_equal_shares_of_one_global_batch():
    """Two ranks read disjoint, equally many sequences; together exactly what one process reads with twice the
    accumulation; every rank divides by the trained tokens of the whole global batch."""
    g = torch.Generator().manual_seed(0)
    store = Store.of([Example(list(range(n)), [False] + [True] * (n - 1), [], "")
                      for n in torch.randint(2, T + 2, (60,), generator=g).tolist()])
    one = Batches(store, 2, 2, seed=3, seq_len=T)
    ranks = [Batches(store, 2, 1, world_size=2, rank=r, seed=3, seq_len=T) for r in (0, 1)]
    assert one.steps_per_epoch == ranks[0].steps_per_epoch > 1
    step = one.steps_per_epoch + 1  # the second epoch: packed again, with another seed
    (micro, n_tokens), shards = one.step(step), [r.step(step) for r in ranks]
    assert [len(m) for m, _ in shards] == [1, 1] and all(m[0][0].shape == (2, T) for m, _ in shards)
    assert n_tokens == shards[0][1] == shards[1][1] == sum(int((labels != -100).sum()) for _, labels, *_ in micro)
    together = torch.cat([m[0][0] for m, _ in shards])
    assert torch.equal(together, torch.cat([ids for ids, *_ in micro]))
    assert not torch.equal(together, torch.cat([ids for ids, *_ in one.step(1)[0]]))


def test_packing_resumes_bitwise_and_evaluates_as_without(tiny_model_dir, tiny_data, tmp_path):
    """train.py --packing: a run resumed from its step-5 checkpoint (the first epoch ends at step 6, so the
    resumed run packs the next epoch itself) ends with the very adapter and metrics of the uninterrupted
    one; the held-out loss before training is the one a run without --packing reports."""
    def flags(steps, out):
        return ["--model", tiny_model_dir, "--data", tiny_data, "--max-steps", steps, "--batch-size", 2,
                "--max-seq-len", 256, "--log-every", 1, "--eval-every", 5, "--eval-exact-match", 0,
                "--data-cache", tmp_path / "cache", "--out", out]
    full, out = tmp_path / "full", tmp_path / "out"
    printed = train_here(*flags(10, full), "--packing", "--save-every", 5)
    assert "global batch 2 sequences of 256 tokens (packed from 61 rows)" in printed
    shutil.copytree(full, out)
    shutil.rmtree(out / "adapter")
    assert "at step 5" in train_here(*flags(10, out), "--packing", "--save-every", 5, "--resume")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (full / "adapter" / "adapter_model.safetensors").read_bytes()
    assert losses(out) == losses(full)
    train_here(*flags(1, tmp_path / "plain"))
    assert losses(tmp_path / "plain")[0] == losses(full)[0] and losses(full)[0]["step"] == 0  # eval before training
