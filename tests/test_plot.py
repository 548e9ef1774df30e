"""The run report: python -m nanotune.plot draws one run or several from their metrics.jsonl, and says
in one line what to install when matplotlib is missing."""
import json
import sys

import pytest

from nanotune.plot import main, report


def run(folder, losses, evals):
    """A metrics.jsonl as train.py writes it: eval lines, then training lines every 10 steps."""
    folder.mkdir()
    rows = [{"step": 0, "eval_loss": evals[0]}, {"step": 0, "exact_match": 0.0}]
    rows += [{"step": 10 * (i + 1), "loss": loss, "lr": 1e-3, "grad_norm": 2.0 / (i + 1)}
             for i, loss in enumerate(losses)]
    rows += [{"step": 10 * len(losses), "eval_loss": evals[1]}, {"step": 10 * len(losses), "exact_match": 0.75}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_draws_one_run_and_compares_several(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = run(tmp_path / "a", [3.0, 2.0, 1.0], [3.2, 1.1]), run(tmp_path / "b", [3.0, 2.5, 2.2], [3.2, 2.3])
    main([a])
    main([a, b, "--out", str(tmp_path / "both.png")])
    for png in (tmp_path / "a" / "loss.png", tmp_path / "both.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines() == [f"saved {a}/loss.png", f"saved {tmp_path / 'both.png'}"]
    with pytest.raises(SystemExit, match="metrics.jsonl is missing; pass the --out folder of a train.py run"):
        main([str(tmp_path)])


def test_without_matplotlib_one_line_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = run(tmp_path / "a", [3.0, 2.0], [3.2, 1.1])
    assert report(out) == f"no {out}/loss.png: drawing it needs matplotlib (pip install nanotune[plot]), then: " \
                          f"python -m nanotune.plot {out}"
    with pytest.raises(SystemExit, match=r"^error: drawing needs matplotlib: pip install nanotune\[plot\]$"):
        main([out])
