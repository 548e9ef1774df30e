import json
import os
import shutil

import pytest
import torch

from nanotune import UserError
from nanotune.data import IGNORE, Batches, collate, encode, load_examples, main as data_main, turns
from nanotune.store import Store
from nanotune.templates import alpaca_prompt as prompt_text, load_template
from nanotune.tokenizer import load_tokenizer

REAL_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gpt-neox-20b",
                              "tokenizer.json")


@pytest.fixture(scope="module")
def alpaca(tiny_model_dir):
    return load_template("auto", tiny_model_dir, load_tokenizer(tiny_model_dir))  # no chat template: alpaca


@pytest.fixture(scope="module")
def tok(alpaca):
    return alpaca.tokenizer


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_prompt_is_masked_and_response_is_trained(tok, alpaca):
    system, dialogue = turns({"instruction": "Reverse the words.", "input": "cat dog", "output": "dog cat"}, "x")
    ex = encode(alpaca, system, dialogue)
    prompt = "### Instruction:\nReverse the words.\n\n### Input:\ncat dog\n\n### Response:\n"
    n_prompt = len(tok.encode(prompt))
    assert ex.prompt == tok.encode(prompt)
    assert ex.trained == [False] * n_prompt + [True] * (len(ex.tokens) - n_prompt)
    assert tok.decode(ex.tokens[n_prompt:-1]) == "dog cat" and ex.tokens[-1] == 0  # EOS
    input_ids, labels = collate([ex], pad_id=1)
    assert torch.equal(input_ids[0], torch.tensor(ex.tokens[:-1]))
    assert torch.equal(labels[0, :n_prompt - 1], torch.full((n_prompt - 1,), IGNORE))
    assert torch.equal(labels[0, n_prompt - 1:], torch.tensor(ex.tokens[n_prompt:]))
    everything = encode(alpaca, system, dialogue, train_on_prompt=True)
    assert all(everything.trained)


def test_sharegpt_trains_on_every_assistant_turn(tok, alpaca):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "red"}, {"from": "human", "value": "more"},
                             {"from": "gpt", "value": "blue"}]}
    ex = encode(alpaca, *turns(row, "x"))
    trained_text = tok.decode([t for t, keep in zip(ex.tokens, ex.trained) if keep and t != 0])
    assert trained_text == "redblue"
    assert tok.decode(ex.tokens).startswith("Be brief.\n\n" + prompt_text("hi"))
    assert sum(t == 0 for t in ex.tokens) == 2  # one EOS per assistant turn


def test_plain_text_rows_train_on_everything(tok, alpaca):
    ex = encode(alpaca, *turns({"text": "red cat"}, "x"))
    assert all(ex.trained) and tok.decode(ex.tokens[:-1]) == "red cat"


@pytest.mark.parametrize("name,text,message", [
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n',
     r"a.jsonl line 2: field 'output' is missing"),
    ("b.json", '[{"instruction": "x", "output": 3}]', r"b.json row 1: field 'output' must be a string, not int"),
    ("c.jsonl", '{"instruction": "x", "output": "y"}\n{oops\n', r"c.jsonl line 2 is not valid JSON"),
    ("d.json", '{"instruction": "x"}', "must hold a JSON array of rows"),
    ("e.json", "", "is empty"),
    ("f.jsonl", '{"prompt": "x"}\n', r"f.jsonl line 1: a row needs 'instruction' and 'output'"),
    ("g.jsonl", '{"conversations": [{"from": "bot", "value": "x"}]}\n', r"conversations\[0\]: unknown role 'bot'"),
])
def test_malformed_rows_name_file_line_and_field(tok, alpaca, tmp_path, name, text, message):
    with pytest.raises(UserError, match=message):
        load_examples(write(tmp_path, name, text), alpaca, 64, log=lambda s: None)


def test_text_that_is_not_utf8_is_one_sentence(tok, alpaca, tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n", encoding="utf-16")
    with pytest.raises(UserError, match="utf16.jsonl is not UTF-8 text .*; save it as UTF-8"):
        load_examples(str(path), alpaca, 64)


def test_tokenizer_json_damaged_or_too_big_for_the_model(tiny_model_dir, tmp_path):
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    size = load_tokenizer(tiny_model_dir, vocab_size=320).vocab_size
    with pytest.raises(UserError, match=f"has {size} tokens but the model's config.json says vocab_size {size - 1}"):
        load_tokenizer(tiny_model_dir, vocab_size=size - 1)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(UserError, match="cannot be read as a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_missing_file_and_all_rows_too_long(tok, alpaca, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_examples(str(tmp_path / "nope.json"), alpaca, 64)
    path = write(tmp_path, "long.jsonl", json.dumps({"instruction": "word " * 50, "output": "x"}) + "\n")
    with pytest.raises(UserError, match="every row is empty after cutting to --max-seq-len 8"):
        load_examples(path, alpaca, 8, log=lambda s: None)


def test_long_rows_are_cut_and_counted(tok, alpaca, tmp_path):
    rows = [{"instruction": "hi", "output": "red " * 40}, {"instruction": "hi", "output": "red"}]
    path = write(tmp_path, "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    examples = load_examples(path, alpaca, 20, log=logged.append)
    assert [len(ex.tokens) for ex in examples][0] == 21
    assert "1 cut to --max-seq-len 20" in logged[0]


def test_batches_are_a_pure_function_of_the_step_and_ranks_are_disjoint(tok, alpaca):
    examples = Store.of([encode(alpaca, None, [("user", "hi"), ("assistant", f"{i}")]) for i in range(20)])
    one = Batches(examples, micro_batch=2, grad_accum=4, seed=3)
    assert one.steps_per_epoch == 2
    rows = [tuple(unit) for unit in one.global_rows(5)]
    assert rows == [tuple(unit) for unit in Batches(examples, 2, 4, seed=3).global_rows(5)]
    assert rows != [tuple(unit) for unit in one.global_rows(4)]  # the next epoch reshuffles
    shards = [Batches(examples, 2, 2, world_size=2, rank=r, seed=3).step(5) for r in (0, 1)]
    seen = [tuple(row.tolist()) for micro, _ in shards for ids, _ in micro for row in ids]
    single = [tuple(row.tolist()) for ids, _ in one.step(5)[0] for row in ids]
    assert sorted(seen) == sorted(single) and len(set(seen)) == 8
    assert shards[0][1] == shards[1][1] == one.step(5)[1]  # every rank knows the global token count


def test_too_little_data_for_one_global_batch(tok, alpaca):
    examples = Store.of([encode(alpaca, None, [("user", "hi"), ("assistant", "x")])] * 3)
    with pytest.raises(UserError, match="3 training rows cannot fill one global batch of 4"):
        Batches(examples, micro_batch=2, grad_accum=1, world_size=2)


@pytest.mark.skipif(not os.path.exists(REAL_TOKENIZER), reason="../shared (the real Pythia tokenizer) is absent")
def test_real_pythia_tokenizer_round_trip(tmp_path):
    shutil.copy(REAL_TOKENIZER, tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))  # as Pythia's config.json says
    real = load_tokenizer(str(tmp_path))
    assert real.encode("Hello world") == [12092, 1533] and real.bos == []
    assert (real.token_to_id("<|endoftext|>"), real.token_to_id("<|padding|>")) == (0, 1)
    ex = encode(load_template("alpaca", str(tmp_path), real), *turns({"instruction": "Say hi.", "output": "Hi there!"},
                                                                    "x"))
    assert real.decode(ex.tokens[:-1]) == prompt_text("Say hi.") + "Hi there!" and ex.tokens[-1] == 0


def test_show_prints_rows_as_train_py_builds_them(tiny_model_dir, alpaca, tmp_path, capsys):
    """python -m nanotune.data --show: brackets around what the loss sees; --json: ids and one flag per
    token, the very rows load_examples builds (cut to --max-seq-len), token 0 never a target."""
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"},
                               {"from": "human", "value": "more"}, {"from": "gpt", "value": "blue"}]}]
    path = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data_main(["--model", tiny_model_dir, "--data", path, "--show", "1"])
    out = capsys.readouterr().out
    n = len(alpaca.tokenizer.encode("red")) + len(alpaca.tokenizer.encode("blue")) + 2  # each with its EOS
    assert "[[red<|endoftext|>]]" in out and "[[blue<|endoftext|>]]" in out and f"({n} trained tokens" in out
    data_main(["--model", tiny_model_dir, "--data", path, "--show", "1", "--json", "--mask-history",
               "--max-seq-len", "40"])
    row = json.loads(capsys.readouterr().out)
    (ex,) = load_examples(path, alpaca, 40, mask_history=True, log=lambda s: None)
    assert row == {"tokens": ex.tokens, "trained": [False] + ex.trained[1:]} and len(ex.tokens) <= 41
    assert alpaca.tokenizer.decode([t for t, k in zip(row["tokens"], row["trained"]) if k]) == "blue"
