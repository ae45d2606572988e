"""Multi-token prediction objectives: one module each, all living in the output tail, all known
to the rest of the project only through the registry in `model.mtp.objective`."""

from model.mtp.objective import (
    NO_MTP,
    MTPObjective,
    Option,
    TailInputs,
    mtp_kinds,
    objective_class,
    objective_kinds,
)

__all__ = ["NO_MTP", "MTPObjective", "Option", "TailInputs", "mtp_kinds", "objective_class",
           "objective_kinds"]
