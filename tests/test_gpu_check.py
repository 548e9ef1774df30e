"""bench/gpu_check.py, the one command a GPU lease runs: its driver (timeouts that kill a part's whole
process group, the budget, the JSON), a real --tiny run of two cheap parts on the CPU, the pytest
plugin that picks the CUDA tests, and the carried bitsandbytes. Its GPU figures are measured, not tested."""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
Part, Skip = gpu_check.Part, gpu_check.Skip

SPAWN = ("import subprocess, sys; p = subprocess.Popen(['sleep', '60']); open(sys.argv[1], 'w').write(str(p.pid)); "
         "p.wait()")


def alive(pid):
    """Running, not a zombie waiting for a parent that does not reap."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def skip(reason):
    raise Skip(reason)


def test_driver_kills_a_hung_part_skips_for_budget_and_writes_the_json(tmp_path, capsys):
    py, pid_file = sys.executable, tmp_path / "grandchild.pid"
    parts = [
        Part("quick", 1, 30, lambda run: [py, "-c", "print('json {\"mfu\": 0.5}')"],
             lambda run, f: {"mfu": gpu_check.target(f["mfu"], ">=", 0.45)}),
        Part("hang", 1, 1, lambda run: [py, "-c", SPAWN, str(pid_file)]),  # a child that starts its own child
        Part("absent", 1, 30, lambda run: skip("no such feature yet")),
        Part("fails", 1, 30, lambda run: [py, "-c", "import sys; print('json {\"mfu\": 0.1}'); sys.exit(2)"],
             lambda run, f: {"mfu": gpu_check.target(f["mfu"], ">=", 0.45)}),
        Part("late", 10_000, 30, lambda run: [py, "-c", "pass"]),
    ]
    args = argparse.Namespace(out=str(tmp_path / "out"), tiny=False, budget=60, parts=None)
    start = time.time()
    gpu_check.main(args, parts)
    assert time.time() - start < 20  # the hung part was killed at its 1 s timeout
    assert not alive(int(pid_file.read_text()))  # and so was the grandchild: the whole process group
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {"tiny", "device", "budget_s", "started", "seconds", "parts", "targets_met"} <= report.keys()
    quick, hang, absent, fails, late = report["parts"]
    assert quick["status"] == "ok" and quick["returncode"] == 0 and quick["figures"] == {"mfu": 0.5}
    assert quick["targets"]["mfu"] == {"value": 0.5, "target": ">= 0.45", "met": True}
    assert hang["status"] == "timeout" and hang["seconds"] < 15
    assert absent == {"name": "absent", "status": "skipped", "reason": "no such feature yet"}
    assert fails["status"] == "failed" and fails["returncode"] == 2
    assert late["status"] == "skipped" and late["reason"].startswith("budget:")
    assert report["targets_met"] == {"quick: mfu": True, "fails: mfu": False}
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "===== quick:" in log and 'json {"mfu": 0.5}' in log
    assert "targets missed: fails: mfu" in capsys.readouterr().out


def test_tiny_run_of_two_parts_on_the_cpu(tmp_path):
    """The real parts: env runs anywhere, fp16 needs CUDA and says so."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), str(tmp_path), "--tiny",
                           "--parts", "env,fp16"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tiny"] is True and report["device"] == "cpu"
    env, fp16 = report["parts"]
    assert env["status"] == "ok" and env["figures"]["torch"] and env["figures"]["gpu"] is None
    assert fp16["status"] == "skipped" and "needs CUDA" in fp16["reason"]


def test_unknown_part_is_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), str(tmp_path),
                           "--parts", "env,lora"], capture_output=True, text=True)
    assert proc.returncode == 1 and "--parts: no part named lora; the parts: env, tests," in proc.stderr


class Item:  # what the plugin reads of a pytest item
    def __init__(self, nodeid, reason=None):
        self.nodeid, self.reason = nodeid, reason

    def iter_markers(self):
        return [argparse.Namespace(name="skipif", kwargs={"reason": self.reason})] if self.reason else []


def test_plugin_keeps_the_cuda_tests_and_their_cpu_cases():
    items = [Item("tests/test_model.py::test_loss[cpu]"),
             Item("tests/test_model.py::test_loss[cuda]", "needs a CUDA GPU"),
             Item("tests/test_model.py::test_other"), Item("tests/test_x.py::test_y[a]", "needs bitsandbytes"),
             Item("tests/test_gpu.py::test_anything"), Item("tests/test_gpu_check.py::test_z")]
    deselected = []
    config = argparse.Namespace(hook=argparse.Namespace(pytest_deselected=lambda items: deselected.extend(items)))
    gpu_check.pytest_collection_modifyitems(config, items)
    assert [i.nodeid for i in items] == ["tests/test_model.py::test_loss[cpu]", "tests/test_model.py::test_loss[cuda]",
                                         "tests/test_gpu.py::test_anything"]
    assert len(deselected) == 3


def test_parsers():
    assert gpu_check.read_pytest_counts("x\n5 passed, 3 skipped, 342 deselected in 41.2s\n") == \
        {"passed": 5, "skipped": 3, "deselected": 342}
    assert gpu_check.read_pytest_counts("19/350 tests collected (331 deselected) in 5.2s") == \
        {"deselected": 331, "collected": 19}
    assert gpu_check.read_pytest_counts("1 failed, 2 passed, 1 error in 3.0s") == {"failed": 1, "passed": 2, "error": 1}
    out = ("before training: eval loss 2.9117, perplexity 18.39\nstep 1/4 | loss 2.6599 | lr\n"
           "step 2: fp16 gradients overflowed; step skipped, loss scale now 32768.0\nstep 4: eval loss 2.6967, x\n")
    figures = gpu_check.train_losses(out)
    assert figures == {"eval_losses": [2.9117, 2.6967], "losses": [2.6599], "overflows": 1}
    assert gpu_check.loss_check(None, figures)["eval loss after - before"]["met"] is True
    assert gpu_check.json_line("a\njson {\"x\": 1}\njson {\"x\": 2}\n") == {"x": 2} and gpu_check.json_line("") == {}


def test_make_carry_keeps_the_package_its_metadata_and_only_the_gpu_machines_libraries(tmp_path):
    if not importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is not installed")
    gpu_check.make_carry(str(tmp_path))
    libs = sorted(f for f in os.listdir(tmp_path / "bitsandbytes") if f.startswith("libbitsandbytes_"))
    assert libs and all(f.startswith(("libbitsandbytes_cpu", "libbitsandbytes_cuda13")) for f in libs)
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])  # transformers checks the version here
    assert dist.metadata["Name"] == "bitsandbytes" and dist.version == importlib.metadata.version("bitsandbytes")
    assert not any("__pycache__" in root for root, _, _ in os.walk(tmp_path))


def test_issue_25_parts_read_their_figures():
    out = "before training: exact match 12.5% on 8 held-out rows (0.3s)\nafter training: exact match 50.0% on 8\n"
    assert gpu_check.train_figures(out)["exact_match"] == [0.125, 0.5]
    met = gpu_check.exact_match_check(None, {"eval_losses": [2.0, 1.5], "exact_match": [0.1, 0.2]})
    assert all(t["met"] for t in met.values())
    codes = {"int8": {"codes_equal": 0.9995, "codes_max_diff": 1}, "nf4": {"codes_equal": 0.99, "codes_max_diff": 1}}
    checked = gpu_check.quant_codes_check(None, codes)
    assert checked["int8 codes at most 1 apart"]["met"] and not checked["nf4 codes equal"]["met"]
    run = argparse.Namespace(tiny=False)
    figures = {"32": {"max_rel_err": 1e-7, "fp32_matmul_tflops": 50}, "bf16": {"fp32_matmul_tflops": 300}}
    assert all(t["met"] for t in gpu_check.tf32_check(run, figures).values())
    figures = {"max_diff_window_None": 0.004, "max_diff_window_256": 0.3, "masked_x_per_row_speed": 5}
    assert [t["met"] for t in gpu_check.packed_attention_check(run, figures).values()] == [True, False, True]


def test_issue_30_parts_read_their_figures():
    """The DPO and GRPO benches' ratio lines, the Gemma 2 part's checks, and a losses check that a NaN fails."""
    out = ("nanotune / TRL: 1.62x tokens/s, 1.70x tokens/CPU-s; with its reference pass 1.40x and 1.51x; "
           "0.49x the training memory\n")
    figures = gpu_check.read_dpo(out)
    assert figures == {"tokens_per_s_x_trl": 1.62, "training_memory_x_trl": 0.49}
    assert all(t["met"] for t in gpu_check.dpo_trl_check(None, figures).values())
    assert gpu_check.dpo_trl_check(None, gpu_check.read_dpo(out.replace("1.62x", "1.2x")))["tokens/s x TRL"]["met"] is False
    assert gpu_check.read_grpo("  nanotune / TRL: 1.23x (wall), 1.30x (CPU)\n") == {"completions_per_s_x_trl": 1.23}
    figures = {"generation_equal": False, "loss_rel_diff_float32": 0.0, "loss_rel_diff_bfloat16": 0.05,
               "grad_finite_float32": True, "grad_finite_bfloat16": True}
    assert [t["met"] for t in gpu_check.gemma2_check(None, figures).values()] == [False, True, False, True]
    assert gpu_check.finite_loss_check(None, {"losses": [0.7, 0.6]})["losses logged, all finite"]["met"] is True
    for losses in ([0.7, float("nan")], []):
        assert gpu_check.finite_loss_check(None, {"losses": losses})["losses logged, all finite"]["met"] is False
