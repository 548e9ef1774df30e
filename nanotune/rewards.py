"""Rewards for --objective grpo: functions that score completions, built in or written by the user.

A reward is a plain Python function, as TRL's reward functions are:

    def reward(prompts, completions, references) -> list[float]

called once per step with three lists of the same length, one entry per completion: the user turn the
completion answers (as written in the data), the completion's text (its stop token left out), and the row's
reference answer (None for a row that has none). It returns one number per completion; larger is better.
--reward names built-ins or FILE.py:FUNCTION; several are summed, weighted by --reward-weights.
"""
import functools
import importlib.util
import math
import os

from nanotune import UserError


def exact_match(prompts, completions, references):
    """1 when the completion equals the reference answer, spaces around either aside (as train.py's exact
    match scores), else 0."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references)]


def length(prompts, completions, references):
    """A length penalty: minus the completion's distance in characters from the reference's length, as a
    share of it, at most 1: 0 for an answer as long as the reference, -1 for one twice as long or empty."""
    return [-min(1.0, abs(len(c.strip()) - len(r.strip())) / max(len(r.strip()), 1))
            for c, r in zip(completions, references)]


BUILT_IN = {"exact_match": exact_match, "length": length}  # both compare with the row's answer


@functools.cache  # one import of a user's file per run, however often training and evaluation score
def load_rewards(specs: tuple):
    """--reward specs -> [(name, function)]: a built-in's name, or FILE.py:FUNCTION (FILE.py alone: its
    function `reward`). The name logs as reward_<name>: the built-in's, or the function's."""
    found = []
    for spec in specs:
        if spec in BUILT_IN:
            found.append((spec, BUILT_IN[spec]))
            continue
        path, _, name = spec.rpartition(":") if ":" in spec else (spec, ":", "reward")
        if not path.endswith(".py"):
            raise UserError(f"--reward {spec}: not a built-in reward ({', '.join(BUILT_IN)}) nor FILE.py:FUNCTION")
        if not os.path.isfile(path):
            raise UserError(f"--reward {spec}: the file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"nanotune_reward_{len(found)}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say where it failed, in one sentence
            raise UserError(f"--reward {spec}: importing {path} raised {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise UserError(f"--reward {spec}: {path} has no function {name!r}; define "
                            f"def {name}(prompts, completions, references) -> list[float]")
        found.append((name, function))
    names = [name for name, _ in found]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"--reward: two rewards are named {name!r} (each logs as reward_<name>); give each once, "
                            "or rename one function")
    return found


def score(rewards, prompts, completions, references):
    """The rewards of every completion: one list per reward function, each as long as `completions`.
    A function that raises, or returns anything but one finite number per completion, stops the run with
    a sentence naming it."""
    scores = []
    for name, function in rewards:
        if BUILT_IN.get(name) is function and None in references:
            raise UserError(f"reward {name} compares with each row's reference answer, and a row has none; give "
                            "every row an answer ('output', 'answer' or an assistant turn) or use another reward")
        try:
            values = function(list(prompts), list(completions), list(references))
        except Exception as e:
            raise UserError(f"reward {name} raised {type(e).__name__}: {' '.join(str(e).split())}") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"reward {name} must return a list of numbers, one per completion; it returned "
                            f"{type(values).__name__} {str(values)[:80]}") from None
        if len(values) != len(completions):
            raise UserError(f"reward {name} returned {len(values)} values for {len(completions)} completions; it "
                            "must return one number per completion")
        if not all(map(math.isfinite, values)):
            raise UserError(f"reward {name} returned a value that is not finite (nan or inf); return finite numbers")
        scores.append(values)
    return scores
