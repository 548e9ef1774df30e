"""Generation with a KV cache against the way it was done before: the whole sequence run again for
every new token, one prompt at a time. Greedy tokens must be identical for every family, for rows of
different lengths batched together, with an adapter and on quantized bases; sampling keeps to top-k
and top-p."""
import pytest
import torch

from conftest import tiny_config
from nanotune.generate import generate, pick
from nanotune.lora import inject_lora
from nanotune.models import MODEL_TYPES
from nanotune.models.gpt_neox import GPTNeoX
from nanotune.quantize import quantize
from test_families import FAMILIES
from test_llama import perturb

PROMPTS = [[5, 17, 3], [9, 40, 2, 77, 12, 6, 31], [8, 8, 60, 4, 19, 23, 50, 11, 2, 90, 13, 7]]  # 3, 7 and 12 tokens
NEW = 10  # with the longest prompt, 22 positions: Mistral's window of 8 masks most of them


@torch.no_grad()
def recompute(model, prompt, max_new_tokens):
    """The reference: the whole sequence through the model for each new token, the last logits kept."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def tiny(family, seed=0):
    torch.manual_seed(seed)
    if family == "gpt_neox":
        model = GPTNeoX(tiny_config())
    else:
        cls = MODEL_TYPES[FAMILIES[family]["model_type"]]
        model = cls(cls.config_class.from_hf(FAMILIES[family], "test"))
    perturb(model, seed)  # norms and biases off their initial values too
    return model.eval()


@pytest.mark.parametrize("family", ["gpt_neox", *FAMILIES])
def test_cached_batched_greedy_equals_recompute_token_for_token(family):
    """Three prompts of different lengths in one left-padded batch; a stop id taken from the middle of the
    first row's answer ends that row there while the others go on."""
    model = tiny(family)
    expected = [recompute(model, p, NEW) for p in PROMPTS]
    assert generate(model, PROMPTS, NEW) == expected
    assert [generate(model, [p], NEW)[0] for p in PROMPTS] == expected  # batch of one: no padding at all
    stop = expected[0][5]
    assert generate(model, PROMPTS, NEW, eos={stop}) == [e[:e.index(stop)] if stop in e else e for e in expected]


def test_with_an_adapter_and_under_autocast():
    model = tiny("llama")
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.0)
    perturb(model, seed=1)  # lora_B starts at zero: move it, so the adapter changes the answers
    model.eval()
    assert generate(model, PROMPTS, NEW) == [recompute(model, p, NEW) for p in PROMPTS]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as train.py's exact match runs under bf16-mixed
        assert generate(model, PROMPTS[1:2], 4) == [recompute(model, PROMPTS[1], 4)]


@pytest.mark.parametrize("bits", [8, 4])
def test_on_a_quantized_base(bits):
    pytest.importorskip("bitsandbytes")
    model = quantize(tiny("qwen2"), bits).eval()
    assert generate(model, PROMPTS, NEW) == [recompute(model, p, NEW) for p in PROMPTS]


def test_sampling_keeps_to_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(400, 1)  # 400 rows: 400 draws in one call
    g = torch.Generator().manual_seed(0)
    for top_k, top_p, allowed in [(2, 1.0, {0, 1}), (0, 0.9, {0, 1, 2}), (3, 0.7, {0, 1}), (1, 1.0, {0})]:
        # softmax: 0.64, 0.24, 0.09, 0.03, 0.01; top_p 0.9 keeps the fewest that reach it
        drawn = set(pick(logits, 1.0, top_k, top_p, g).tolist())
        assert drawn == allowed, (top_k, top_p)
    model = tiny("gpt_neox")
    greedy = generate(model, PROMPTS, 6)
    assert generate(model, PROMPTS, 6, temperature=2.0, top_k=1) == greedy
    sample = [generate(model, PROMPTS, 6, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (1, 1)]
    assert sample[0] == sample[1] != greedy  # a seed repeats; sampling is not greedy


def test_keep_stops_one_row_and_the_others_go_on():
    model = tiny("gpt_neox")
    full = generate(model, PROMPTS, 6)
    stop_row_1_at_2 = generate(model, PROMPTS, 6, keep=lambda row, ids: row != 1 or len(ids) < 2)
    assert stop_row_1_at_2 == [full[0], full[1][:2], full[2]]
