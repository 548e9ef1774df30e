"""Jobs that survive their machines: a run told to stop by a signal finishes its step and checkpoints it,
a fixed global batch lets a job restart on another number of processes on the same trajectory, and a
restarted run says what changed.

Who sends the signals: Slurm at a job's time limit (SIGTERM; with --signal=USR1@120, SIGUSR1 two
minutes before), Kubernetes and spot/preemptible instances (SIGTERM, then SIGKILL after a grace
period), and torchrun's agent when it stops its workers, e.g. because a node joins an elastic job
(the signal it received, or SIGTERM; SIGKILL 30 s later, TORCH_ELASTIC_SHUTDOWN_TIMEOUT).

A signal handler only records that a stop was asked for; the training loop looks once per step,
with the loss it already sums over the ranks (no extra collective), so every rank stops after the
same step even when only one was signalled. That step is checkpointed as any other (complete and
atomic), and the run exits with PREEMPTED.
"""
import os
import signal

from nanotune import UserError

PREEMPTED = 75  # exit status after a signal's checkpoint: EX_TEMPFAIL of sysexits.h, "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by train() once the checkpoint of the step a signal stopped is written."""


class StopSignals:
    """While active, SIGTERM and SIGUSR1 set `received` (the first one's name) instead of ending the
    process. A second signal, say while the checkpoint is written, changes nothing: the save goes on.
    The previous handlers come back on exit."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def grad_accum_for(global_batch, micro_batch, world_size, grad_accum):
    """--global-batch N: the gradient accumulation that makes micro-batch x accumulation x processes = N.
    With N fixed, every step reads the same rows whatever the process count (data.Batches), so an
    elastic job that loses or gains nodes resumes on the trajectory it was on."""
    if global_batch < 1:
        raise UserError(f"--global-batch must be >= 1, got {global_batch}")
    if grad_accum != 1:
        raise UserError(f"--global-batch {global_batch} sets --grad-accum itself (global batch / (--batch-size x "
                        "processes)); drop --grad-accum")
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise UserError(f"--global-batch {global_batch} is not a multiple of --batch-size {micro_batch} x "
                        f"{world_size} process(es) = {per_pass} rows; choose a multiple of {per_pass} (for an "
                        "elastic job, of --batch-size x each process count it may run on)")
    return global_batch // per_pass


def restart_line(restarts, saved, grad_accum, world_size, checkpoint):
    """The line a resumed run says what changed with: restart number `restarts` of the run (counted in its
    checkpoints: torchrun's TORCHELASTIC_RESTART_COUNT counts restarts after failures, not those for a node
    that joins), the number of processes and the accumulation before (saved: the checkpoint's flags) and now."""
    return (f"restart {restarts}: {saved['world_size']} -> {world_size} processes, gradient accumulation "
            f"{saved['grad_accum']} -> {grad_accum}, resuming from {os.path.basename(checkpoint)}")
