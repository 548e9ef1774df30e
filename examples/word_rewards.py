"""Example rewards for train.py --objective grpo on the bundled word games (assets/data/train.jsonl):

    python train.py --objective grpo --adapter out/adapter --reward exact_match examples/word_rewards.py:words_in_place

A reward is a plain function of three lists of one entry per completion: the user turn it answers, the
completion's text, and the row's reference answer (None for a row without one). It returns one number per
completion, larger for better; train.py sums the rewards given (weighted by --reward-weights) and compares
each completion with the others of its prompt's group. An exception, or a wrong count, stops the run.
"""


def words_in_place(prompts, completions, references):
    """Partial credit: the share of the reference's words that the completion has at the same place, over
    the longer of the two (1 for an exact answer, less for extra words). Denser than exact match: an answer
    with most words right already scores above one with none."""
    scores = []
    for completion, reference in zip(completions, references):
        got, want = completion.split(), reference.split()
        scores.append(sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1))
    return scores


def one_line(prompts, completions, references):
    """A format reward: -1 for an answer that runs over several lines (every word game answers on one)."""
    return [-1.0 if "\n" in completion.strip() else 0.0 for completion in completions]
