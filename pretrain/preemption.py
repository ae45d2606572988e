"""SIGTERM / SIGUSR1 (SLURM's pre-timeout signal, preemption) → checkpoint at the next step
boundary and exit with exit_codes.PREEMPTED. Kept free of heavy imports so the handler is installed
before the minutes of start-up (imports, model build, checkpoint load) during which the default
action would kill the process."""

from __future__ import annotations

import signal


class PreemptionFlag:
    def __init__(self):
        self.raised = 0

    def install(self) -> PreemptionFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.raised = signum
