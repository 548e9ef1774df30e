"""Draw runs from their metrics.jsonl: python -m nanotune.plot OUT [OUT2 ...] [--out FILE]

Against the optimizer step: the training loss and the held-out loss (top panel), the gradient norm
before clipping (middle) and the learning rate (bottom); the title gives the held-out loss and the
exact match before and after training. A preference run (--objective dpo, ...) adds two panels: the
share of pairs whose chosen answer has the higher reward, and the mean reward margin; a grpo run one:
the mean reward of its sampled completions, and of greedy ones on held-out prompts. One run is drawn
to OUT/loss.png, which train.py also writes at the end of every run; several runs, one colour each, to
--out (default: runs.png), to compare them. matplotlib is an optional extra (pip install nanotune[plot]),
imported only here.
"""
import argparse
import json
import os
import sys

from nanotune import UserError

INSTALL = "pip install nanotune[plot]"


def read_metrics(folder: str) -> list:
    """The rows of folder/metrics.jsonl, one dict each."""
    path = os.path.join(folder, "metrics.jsonl")
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{path} is missing; pass the --out folder of a train.py run") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON lines ({e})") from None
    if not any("loss" in row for row in rows):
        raise UserError(f"{path} holds no training loss yet (train.py logs it every --log-every steps)")
    return rows


def series(rows, key):
    """(steps, values) of the rows that have `key`."""
    pairs = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def summary(rows) -> str:
    """'eval loss 2.91 -> 0.06, exact match 0% -> 94%': the first and last held-out figures."""
    parts = []
    for key, name, fmt in (("eval_loss", "eval loss", "{:.3g}"), ("eval_reward_accuracy", "reward accuracy", "{:.0%}"),
                           ("eval_reward", "eval reward", "{:.3g}"),
                           ("exact_match", "exact match", "{:.0%}")):
        _, values = series(rows, key)
        if values:
            parts.append(f"{name} " + " -> ".join(fmt.format(v) for v in (values[0], values[-1])[:len(values)]))
    return ", ".join(parts)


def draw(folders, path):
    """Draw the runs in `folders` into the PNG `path`. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [(folder, read_metrics(folder)) for folder in folders]
    pairs = any("reward_margin" in row for _, rows in runs for row in rows)  # a preference run's figures
    grpo = any("reward_std" in row for _, rows in runs for row in rows)  # a grpo run's: the mean reward
    panels = [("reward_accuracy", "reward accuracy\n(share of pairs)"),
              ("reward_margin", "reward margin\n(chosen - rejected)")] * pairs + \
        [("reward", "mean reward\n(held out: greedy)")] * grpo
    fig, (loss_ax, norm_ax, lr_ax, *reward_axes) = plt.subplots(
        3 + len(panels), 1, figsize=(8, 7 + 1.5 * len(panels)), sharex=True,
        height_ratios=[3, 1, 1] + [1.5] * len(panels), layout="constrained")
    for i, (folder, rows) in enumerate(runs):
        color, name = f"C{i}", os.path.basename(os.path.normpath(folder)) if len(runs) > 1 else ""
        loss_ax.plot(*series(rows, "loss"), color=color, label=f"{name} training loss".strip())
        if series(rows, "eval_loss")[0]:
            loss_ax.plot(*series(rows, "eval_loss"), "o--", color=color, label=f"{name} held-out loss".strip())
        norm_ax.plot(*series(rows, "grad_norm"), color=color)
        lr_ax.plot(*series(rows, "lr"), color=color)
        for ax, (key, _) in zip(reward_axes, panels):
            ax.plot(*series(rows, key), color=color)
            ax.plot(*series(rows, "eval_" + key), "o--", color=color)
    title = f"{folders[0]}: {summary(runs[0][1])}" if len(runs) == 1 else \
        "\n".join(f"{os.path.basename(os.path.normpath(f))}: {summary(rows)}" for f, rows in runs)
    loss_ax.set_title(title, fontsize=10)
    loss_ax.set_ylabel("loss (mean over pairs)" if pairs else "loss per trained token")
    if not grpo:  # grpo's loss is about 0 and may be negative: its figure is the reward
        loss_ax.set_yscale("log")  # a fine-tune falls over decades: a log axis keeps the end of the curve visible
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 0.2, not 2 x 10^-1
        loss_ax.yaxis.set_major_formatter(plain)
        loss_ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))  # ... 0.1 0.2 0.5 1 2 5 ...
        loss_ax.yaxis.set_minor_formatter(plain)
    loss_ax.legend()
    norm_ax.set_ylabel("gradient norm\n(before clipping)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax, (_, name) in zip(reward_axes, panels):
        ax.set_ylabel(name)
    (reward_axes or [lr_ax])[-1].set_xlabel("optimizer step")
    for ax in (loss_ax, norm_ax, lr_ax, *reward_axes):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: str) -> str:
    """Draw OUT/loss.png at the end of a run; the line to print about it."""
    path = os.path.join(out, "loss.png")
    try:
        draw([out], path)
    except ImportError:
        return f"no {path}: drawing it needs matplotlib ({INSTALL}), then: python -m nanotune.plot {out}"
    return f"saved {path}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py --out folders, each with its metrics.jsonl")
    p.add_argument("--out", help="the PNG to write (default: RUN/loss.png for one run, runs.png for several)")
    args = p.parse_args(argv)
    path = args.out or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1 else "runs.png")
    try:
        draw(args.runs, path)
    except ImportError:
        sys.exit(f"error: drawing needs matplotlib: {INSTALL}")
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot write {path} ({e.strerror})")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
