"""train.py end to end on a tiny model: run as a user runs it (a subprocess) where the process is what is
tested (exit code, the one line on stderr), else its main() in this process."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_train, train_here, train_refused, train_script
from nanotune import UserError
from nanotune.generate import main as generate_main
from nanotune.lora import load_adapter
from nanotune.merge import main as merge_main
from nanotune.models import from_pretrained


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_lora_run_lowers_the_loss_and_writes_a_loadable_adapter(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = run_train("--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 30,
                     "--batch-size", 4, "--lr", 1e-2, "--log-every", 5, "--eval-every", 10,
                     "--eval-exact-match", 2, "--lora-dropout", 0)
    assert "step 30/30" in proc.stdout and "ETA" in proc.stdout
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]
    assert len(evals) == 4 and evals[-1] < evals[0]  # before training, at steps 10, 20, 30
    assert sum("exact_match" in r for r in rows) == 2
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 for r in rows if "loss" in r)  # before clipping: not all 1.0
    assert len({r["grad_norm"] for r in rows if "loss" in r}) == 6
    assert f"saved {out / 'loss.png'}" in proc.stdout or "pip install nanotune[plot]" in proc.stdout
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "adapter").st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's 0700
    model = load_adapter(from_pretrained(tiny_model_dir), out / "adapter")
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_full_fine_tune_writes_an_hf_model(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 3,
               "--batch-size", 4, "--no-lora", "--eval-exact-match", 0)
    drawn = ["loss.png"] if importlib.util.find_spec("matplotlib") else []  # the run report, nanotune[plot]
    assert sorted(os.listdir(out)) == ["data-cache", *drawn, "metrics.jsonl", "model"]
    before, after = from_pretrained(tiny_model_dir), from_pretrained(str(out / "model"))
    changed = [n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert len(changed) == len(before.state_dict())  # every weight trained


def test_merge_writes_a_model_equal_to_the_adapted_one(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 5,
               "--batch-size", 4, "--lr", 1e-2, "--merge", "--eval-exact-match", 0)
    adapted = load_adapter(from_pretrained(tiny_model_dir), out / "adapter").eval()
    merged = from_pretrained(str(out / "merged"))
    ids = torch.randint(0, 320, (2, 8))
    torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=1e-5)
    assert os.path.exists(out / "merged" / "tokenizer.json")


def test_generate_cli(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 2,
               "--batch-size", 4, "--eval-exact-match", 0, "--num-layers", 1)
    cli = [sys.executable, "-m", "nanotune.generate", "--model", tiny_model_dir, "--adapter", str(out / "adapter"),
           "--prompt", "Reverse the words.", "--input", "red cat", "--max-new-tokens", "5", "--temperature", "0.8",
           "--top-k", "5"]
    proc = subprocess.run([*cli, "--num-layers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(SystemExit, match="pass the same --num-layers"):
        generate_main(cli[3:])
    sample = ["--model", tiny_model_dir, "--prompt", "Reverse the words.", "--max-new-tokens", "3"]
    generate_main([*sample, "--temperature", "1", "--top-k", "100000", "--top-p", "0.9"])  # k beyond the vocabulary
    for bad in (["--temperature", "-1"], ["--top-p", "0"]):
        with pytest.raises(SystemExit) as e:
            generate_main([*sample, *bad])
        assert e.value.code == 2


def test_a_device_this_machine_lacks_is_one_sentence(tiny_model_dir, tiny_data, tmp_path):
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    for device, message in (("gpu", "--device 'gpu' is not a device; use cpu, cuda or cuda:N"),
                            (missing, f"--device {missing}: this machine has {torch.cuda.device_count()} usable")):
        assert message in train_refused("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o",
                                        "--device", device)
        with pytest.raises(SystemExit, match=message):
            generate_main(["--model", str(tiny_model_dir), "--prompt", "hi", "--device", device])


def test_adapter_flags_that_contradict_the_adapter_are_refused(tiny_model_dir, tiny_data, tmp_path):
    """--adapter takes r, alpha, targets, ... from adapter_config.json; a flag set to something else
    would be silently ignored, so it is refused. The same value, or the default, is fine."""
    common = ["--model", tiny_model_dir, "--data", tiny_data, "--max-steps", 1, "--batch-size", 4,
              "--eval-exact-match", 0]
    train_here(*common, "--out", tmp_path / "a", "--lora-r", 4)
    adapter = tmp_path / "a" / "adapter"
    train_here(*common, "--out", tmp_path / "b", "--adapter", adapter, "--lora-r", 4)
    message = train_refused(*common, "--out", tmp_path / "c", "--adapter", adapter, "--lora-r", 2)
    assert message.startswith(f"--lora-r 2 contradicts the adapter's r = 4 in {adapter}")


def test_a_val_fraction_that_holds_out_nothing_is_said(tiny_model_dir, tiny_data, tmp_path):
    printed = train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o", "--max-steps", 1,
                         "--batch-size", 4, "--val-fraction", 0.001)
    assert "note: --val-fraction 0.001 of 64 rows holds out none, so there is no evaluation" in printed


def test_merge_cli_never_replaces_an_existing_folder(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "out"
    train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", out, "--max-steps", 1, "--batch-size", 4,
               "--eval-exact-match", 0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for target in (tmp_path / "notes", tmp_path / "notes" / "keep.txt", tiny_model_dir):
        with pytest.raises(SystemExit, match="already exists and is not an empty folder"):
            merge_main(["--model", tiny_model_dir, "--adapter", str(out / "adapter"), "--out", str(target)])
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="cannot write in .*choose an --out you can write to"):
        merge_main(["--model", tiny_model_dir, "--adapter", str(out / "adapter"),
                    "--out", str(tmp_path / "notes" / "keep.txt" / "merged")])
    merge_main(["--model", tiny_model_dir, "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")])
    assert os.path.exists(tmp_path / "merged" / "model.safetensors")


def test_bf16_lora_weights_train_and_fp16_ones_are_not_offered(tiny_model_dir, tiny_data, tmp_path, capsys):
    """--lora-dtype bf16 follows the fp32 run to bf16's rounding and saves bf16 tensors."""
    losses = {}
    for dtype in ("fp32", "bf16"):
        train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / dtype, "--max-steps", 10,
                   "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 2, "--log-every", 1, "--eval-every", 0,
                   "--eval-exact-match", 0, "--lora-dtype", dtype)
        losses[dtype] = [r["loss"] for r in metrics(tmp_path / dtype) if "loss" in r]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=1e-2) and losses["bf16"][-1] < losses["bf16"][0] - 0.2
    saved = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    with pytest.raises(SystemExit) as e:
        train_script().parse_args(["--lora-dtype", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--lora-alpha", 0], "--lora-alpha must be > 0 and finite, got 0.0"),
    (["--epochs", "inf"], "--epochs must be > 0 and finite, got inf"),
    (["--log-every", 0], "--log-every must be >= 1, got 0"),
    (["--save-every", -1], "--save-every must be >= 0, got -1"),
    (["--eval-every", -1], "--eval-every must be >= 0, got -1"),
    (["--eval-exact-match", -1], "--eval-exact-match must be >= 0, got -1"),
    (["--keep", -1], "--keep must be >= 0, got -1"),
    (["--max-grad-norm", -1], "--max-grad-norm must be >= 0, got -1.0"),
    (["--weight-decay", -1], "--weight-decay must be >= 0, got -1.0"),
    (["--batch-size", 0], "--batch-size must be >= 1, got 0"),
    (["--max-steps", 0], "--max-steps must be >= 1 (or -1 to use --epochs), got 0"),
])
def test_every_number_flag_is_checked(tmp_path, flags, message):
    """check_args in-process (fast); test_nonsensical_numbers runs train.py for the exit code."""
    train = train_script()
    with pytest.raises(UserError) as e:
        train.check_args(train.parse_args(["--out", str(tmp_path / "o"), *map(str, flags)]))
    assert str(e.value) == message


def test_nonsensical_numbers(tiny_model_dir, tiny_data, tmp_path):
    """The sentence; the process's one line (error: ..., exit 1) is the next test's."""
    assert train_refused("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path, "--lr", 0) == \
        "--lr must be > 0 and finite, got 0.0"


def test_bad_paths_are_one_line_and_nonzero(tiny_model_dir, tiny_data, tmp_path):
    proc = run_train("--model", tmp_path / "none", "--data", tiny_data, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "does not exist" in proc.stderr
    fails = train_refused  # the same sentence, without a process each
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    os.remove(no_tokenizer / "tokenizer.json")
    assert "tokenizer.json is missing" in fails("--model", no_tokenizer, "--data", tiny_data, "--out", tmp_path / "o")
    (tmp_path / "a-file").write_text("")
    assert "cannot write in" in fails("--model", tiny_model_dir, "--data", tiny_data,
                                      "--out", tmp_path / "a-file" / "o")
    assert "does not exist" in fails("--model", tiny_model_dir, "--data", tmp_path / "no.json",
                                     "--out", tmp_path / "o")
    assert "is a folder" in fails("--model", tiny_model_dir, "--data", tmp_path, "--out", tmp_path / "o")
    (tmp_path / "none.json").write_text("[]")
    assert "holds an empty JSON array" in fails("--model", tiny_model_dir, "--data", tmp_path / "none.json",
                                                "--out", tmp_path / "o")
    assert not os.path.exists(tmp_path / "o" / "adapter") and not os.path.exists(tmp_path / "o" / "metrics.jsonl")


@pytest.mark.parametrize("version,flags,refused", [
    ("2.11.0+cu130", ["--load-in-4bit", "--precision", "32"], "needs torch >= 2.12"),
    ("2.12.0", ["--load-in-4bit", "--precision", "bf16"], None),
    ("2.7.1", ["--precision", "bf16"], "needs torch >= 2.8"),
    ("2.7.1", ["--precision", "bf16-true", "--lora-dtype", "bf16"], None),  # one dtype in every block
    ("2.7.1", ["--precision", "bf16", "--no-lora"], None),  # everything trains, in fp32
    ("2.8.0", ["--precision", "bf16"], None)])
def test_fsdp_refuses_a_torch_too_old_for_it(monkeypatch, version, flags, refused):
    """FSDP of 4-bit codes and of blocks mixing dtypes, against the running torch's version."""
    from nanotune.checks import check_combination
    from nanotune.distributed import World
    monkeypatch.setattr(torch, "__version__", version)
    args = train_script().parse_args(["--strategy", "fsdp", *flags])
    if refused is None:
        check_combination(args, World(strategy="fsdp"))
        return
    with pytest.raises(UserError, match=refused) as e:
        check_combination(args, World(strategy="fsdp"))
    assert f"this is torch {version};" in str(e.value) and "\n" not in str(e.value)
