"""The exit codes of `mtp` commands: what the CLI returns, what the trainer ends with, and what
the SLURM script (scripts/slurm/train.sbatch, which restates them in shell) acts on."""

from __future__ import annotations

OK = 0
"""Done."""
USAGE = 2
"""Bad config, flags or input data: refused before any work (or nothing was changed)."""
NONFINITE = 3
"""A non-finite loss or gradient with train.nonfinite = stop."""
SAVE_FAILED = 4
"""A checkpoint could not be written (disk full, write error); the previous one is kept."""
PEER_LOST = 5
"""A peer process died or a collective timed out (train.collective_timeout_s)."""
OUT_OF_MEMORY = 6
"""The device ran out of memory: the config does not fit (a requeue would fail the same way)."""
PREEMPTED = 75
"""Stopped by SIGTERM/SIGUSR1 after saving a checkpoint (EX_TEMPFAIL): requeue and resume."""
INTERRUPTED = 130
"""Ctrl-C."""

TRAIN_EPILOG = f"""\
exit codes: {OK} done; {USAGE} bad config or input, or RUN_DIR in use by another job (nothing was
trained); {NONFINITE} non-finite loss with train.nonfinite=stop; {SAVE_FAILED} a checkpoint could not be
written (disk full, write error, or another job took RUN_DIR over; the previous complete
checkpoint is kept); {PEER_LOST} a peer process died or a collective timed out
(train.collective_timeout_s); {OUT_OF_MEMORY} out of GPU memory (see `mtp plan`); {PREEMPTED} stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue
and resume with --resume auto). Under torchrun, whose exit code is 1 whenever a worker fails,
read the workers' codes in its failure report."""
