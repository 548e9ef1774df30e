"""Jobs that survive their machines: --global-batch, and elastic jobs (torchrun's c10d rendezvous through
launch.sh) that lose or gain a node mid-run and finish on the trajectory of an uninterrupted run.
The stop on SIGTERM/SIGUSR1 itself is tested in test_resume.py."""
import pytest

from conftest import train_here, train_refused


def test_global_batch_derives_the_accumulation(tiny_model_dir, tiny_data, tmp_path):
    printed = train_here("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o", "--max-steps", 1,
                         "--batch-size", 2, "--global-batch", 8, "--eval-exact-match", 0, "--val-fraction", 0)
    assert "global batch 8 rows = micro-batch 2 x grad-accum 4 x 1 process(es)" in printed


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", 4, "--global-batch", 6], "--global-batch 6 is not a multiple of --batch-size 4 x 1 process(es) "
     "= 4 rows; choose a multiple of 4 (for a job whose process count changes, one that every count it may run on "
     "divides)"),
    (["--batch-size", 4, "--global-batch", 2], "--global-batch 2 is not a multiple of --batch-size 4 x 1"),
    (["--global-batch", 0], "--global-batch must be >= 1, got 0"),
    (["--global-batch", 8, "--grad-accum", 2], "--global-batch 8 sets --grad-accum itself (global batch / "
     "(--batch-size x processes)); drop --grad-accum"),
])
def test_global_batch_refusals(tiny_model_dir, tiny_data, tmp_path, flags, message):
    assert train_refused("--model", tiny_model_dir, "--data", tiny_data, "--out", tmp_path / "o",
                         *flags).startswith(message)
