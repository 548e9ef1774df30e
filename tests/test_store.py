"""The tokenized store (nanotune.store): the same rows as the one-row path, cached by what makes them,
never used half-written, built by one process while another waits."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import CPU_ONLY, ROOT, alpaca_rows
from nanotune import UserError
from nanotune.data import load_examples
from nanotune.store import load_store
from nanotune.templates import load_template
from nanotune.tokenizer import load_tokenizer

SHARED = os.path.join(ROOT, "..", "shared", "data")
CHAT = ("{% for m in messages %}{{ '<' + m.role + '> ' + m.content + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}")


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def store_of(data, model, cache, max_seq_len=64, log=None, **flags):
    template = load_template("auto", model, load_tokenizer(model))
    return load_store(data, template, model, str(cache), max_seq_len, log=log or (lambda line: None), **flags)


def same_rows(store, examples):
    assert len(store) == len(examples)
    for i, ex in enumerate(examples):
        assert store[i].tokens.tolist() == ex.tokens and store[i].trained.astype(bool).tolist() == ex.trained


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer with a Jinja chat template of its own (tokenized whole, masked by offsets)."""
    folder = tmp_path_factory.mktemp("chat")
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(os.path.join(tiny_model_dir, name), folder / name)
    (folder / "chat_template.jinja").write_text(CHAT)
    return str(folder)


@pytest.mark.parametrize("model", ["tiny_model_dir", "chat_model"])
def test_the_store_holds_what_the_one_row_path_makes(model, request, tmp_path):
    """Batched tokenization (one tokenizer call per batch) gives the ids and masks of data.encode row by row,
    for the alpaca template (pieces) and a Jinja one (offsets); rows cut, a row left with no target dropped,
    plain text and ShareGPT rows among them."""
    model = request.getfixturevalue(model)
    rows = alpaca_rows(40) + [{"text": "red cat " * 30}, {"instruction": "blue " * 300, "output": "x"},
                              {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"},
                                                 {"from": "human", "value": "more"}, {"from": "gpt", "value": "blue"}]}]
    data = write(tmp_path / "rows.jsonl", rows)
    for flags in ({}, {"mask_history": True}, {"train_on_prompt": True}):
        store = store_of(data, model, tmp_path / "cache", **flags)
        same_rows(store, load_examples(data, load_template("auto", model, load_tokenizer(model)), 64,
                                       log=lambda line: None, **flags))
        assert store.meta["cut"] == 2 and store.meta["dropped"] == (0 if flags.get("train_on_prompt") else 1)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "gpt-neox-20b")), reason="../shared is absent")
def test_alpaca_demo_through_the_real_pythia_tokenizer(tmp_path):
    shutil.copy(os.path.join(SHARED, "gpt-neox-20b", "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    data = os.path.join(SHARED, "sft", "alpaca_en_demo.json")
    store = store_of(data, str(tmp_path), tmp_path / "cache", max_seq_len=512)
    same_rows(store, load_examples(data, load_template("auto", str(tmp_path), load_tokenizer(str(tmp_path))), 512,
                                   log=lambda line: None))
    assert len(store) == 999 and store.meta["tokens"] == int(store.lengths.sum())


def test_cached_rebuilt_on_change_and_never_used_half_written(tiny_model_dir, tmp_path):
    data, cache, logged = write(tmp_path / "rows.jsonl", alpaca_rows(30)), tmp_path / "cache", []
    first = store_of(data, tiny_model_dir, cache, log=logged.append)
    assert "built in" in logged[-1] and "30 rows" in logged[-1]
    again = store_of(data, tiny_model_dir, cache, log=logged.append)
    assert logged[-1].endswith("(from cache)") and np.array_equal(again.arrays["tokens"], first.arrays["tokens"])
    alpaca = load_template("alpaca", tiny_model_dir, load_tokenizer(tiny_model_dir))  # what auto resolved to
    load_store(data, alpaca, tiny_model_dir, str(cache), 64, log=logged.append)
    assert logged[-1].endswith("(from cache)")
    store_of(data, tiny_model_dir, cache, train_on_prompt=True, log=logged.append)  # another flag: another store
    assert "built in" in logged[-1]
    write(tmp_path / "rows.jsonl", alpaca_rows(31))  # the file changed: built again
    assert len(store_of(data, tiny_model_dir, cache, log=logged.append)) == 31 and "built in" in logged[-1]
    folder = re.search(r"MB in (\S+) \(built", logged[-1]).group(1)
    tokens = os.path.join(folder, "tokens.int32")
    with open(tokens, "r+b") as f:  # a store cut short (a crash mid-copy, a full disk) is never mapped
        f.truncate(os.path.getsize(tokens) - 4)
    os.makedirs(os.path.join(cache, f".{os.path.basename(folder)}.tmp-99999"))  # what a killed builder leaves
    assert len(store_of(data, tiny_model_dir, cache, log=logged.append)) == 31
    assert "incomplete or damaged; building it again" in logged[-2] and "built in" in logged[-1]
    os.remove(os.path.join(folder, "meta.json"))  # a folder without its meta.json: the same
    store_of(data, tiny_model_dir, cache, log=logged.append)
    assert "building it again" in logged[-2] and not [n for n in os.listdir(cache) if ".tmp-" in n]


def test_bad_input_is_one_sentence_and_leaves_no_store(tiny_model_dir, tmp_path):
    """A bad row stops the build with file, line and field; a cache folder that cannot be written, too."""
    data = write(tmp_path / "rows.jsonl", alpaca_rows(3) + [{"instruction": "x", "output": 3}])
    with pytest.raises(UserError, match=r"rows.jsonl line 4: field 'output' must be a string, not int"):
        store_of(data, tiny_model_dir, tmp_path / "cache")
    assert [n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")] == []
    with pytest.raises(UserError, match="cannot write the data cache in .*; pass --data-cache a folder you can"):
        store_of(write(tmp_path / "ok.jsonl", alpaca_rows(3)), tiny_model_dir, tmp_path / "ok.jsonl" / "cache")


def test_two_processes_build_one_store(tiny_model_dir, tmp_path):
    """Started together, as torchrun starts ranks: one builds, the other waits on the lock, then maps it."""
    data = write(tmp_path / "rows.jsonl", alpaca_rows(3000))
    script = ("from nanotune.store import load_store; from nanotune.templates import load_template\n"
              "from nanotune.tokenizer import load_tokenizer\n"
              f"template = load_template('auto', {tiny_model_dir!r}, load_tokenizer({tiny_model_dir!r}))\n"
              f"s = load_store({data!r}, template, {tiny_model_dir!r}, {str(tmp_path / 'cache')!r}, 64)\n"
              "print(int(s.arrays['tokens'].sum()))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**CPU_ONLY, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    logs = sorted(out.splitlines()[0] for out, _ in outs)
    assert "built in" in logs[0] and logs[1].endswith("(from cache)")
    assert outs[0][0].splitlines()[1] == outs[1][0].splitlines()[1]
