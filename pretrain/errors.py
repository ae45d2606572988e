"""What an `mtp` command reports as one line on stderr instead of a traceback.

Commands raise `UsageError` for user mistakes — a wrong or missing path, an incomplete export or
run directory, corrupt data, lengths that do not fit the model, a bad combination of flags — with
a message naming the problem and the fix in the command's own terms (its flags, config keys),
never Python parameters. `pretrain.cli.main` prints it once per job and returns its exit code;
anything else is an internal error and keeps its traceback.
"""

from __future__ import annotations

from pretrain import exit_codes


class CommandError(Exception):
    """A failure a command explains in one line and ends with `exit_code`.

    `every_rank`: every process of the job meets it alike (a config, a path, a lock), so one
    process (global rank 0) reports it and the others exit quietly with the same code. False
    for what one rank alone may meet (a shard only it reads): that rank reports it, by rank.
    """

    def __init__(self, message: str, exit_code: int, *, label: str = "error",
                 every_rank: bool = True):
        super().__init__(message)
        self.exit_code, self.label, self.every_rank = exit_code, label, every_rank


class UsageError(CommandError):
    """A user mistake: exit code 2 (exit_codes.USAGE); nothing was changed."""

    def __init__(self, message: str, *, label: str = "error", every_rank: bool = True):
        super().__init__(message, exit_codes.USAGE, label=label, every_rank=every_rank)
