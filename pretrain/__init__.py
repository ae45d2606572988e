"""Training job: composes `model` and `data_pipeline` into the `mtp` command."""
