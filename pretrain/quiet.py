"""Start-up notices of third-party libraries that do not concern our users, kept off the console.

DeepSpeed announces its CPU fallback on every command of a machine without a GPU ("Setting
accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."); the
device a run uses is stated in its own header and in RUN_DIR/runtime.json, where the trainer also
records the notices held back here (`SUPPRESSED`). megatron-core's import-time notices about
Transformer Engine and Apex are silenced where `model` imports it (model/__init__.py). Only
these exact messages are filtered: every other warning and log line passes.
"""

from __future__ import annotations

import logging
import warnings

# DeepSpeed's logger ("DeepSpeed"), by message prefix.
DEEPSPEED_NOTICES = ("Setting accelerator to CPU",)
# Python warnings, by regular expression (as warnings.filterwarnings takes them).
WARNING_PATTERNS = (
    r".*Transformer Engine and Apex.*",
    r".*Apex is not installed.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",  # megatron's hint for an overlap path we do not use
    # DeepSpeed's ZeRO gathers through an API that torch has deprecated (once per process)
    r".*`torch.distributed.all_gather_into_tensor` is deprecated.*",
)

SUPPRESSED: list[str] = []
"""The DeepSpeed notices held back in this process, in order (for the run's records)."""


class _DeepSpeedNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(DEEPSPEED_NOTICES):
            SUPPRESSED.append(message)
            return False
        return True


_FILTER = _DeepSpeedNotices()


def quiet_third_party() -> None:
    """Install the filters (idempotent). Call it where the process starts, before the imports
    that emit them: a logger's filters stay when DeepSpeed configures the logger later."""
    for pattern in WARNING_PATTERNS:
        warnings.filterwarnings("ignore", message=pattern)
    logger = logging.getLogger("DeepSpeed")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
