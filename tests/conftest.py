"""Test-wide environment: CPU accelerator, no JIT builds, quiet third-party warnings."""

import os
import tempfile

# Before any DeepSpeed import: run on CPU, and keep JIT extension builds (if anything triggers one)
# out of the home directory so a test never silently spends 90 s building.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "mtp-torch-ext"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Hand-written Triton kernels (model/loss_kernels.py) run through Triton's interpreter on CPU
# tensors; read when the kernels are defined, so it must be set before `model` is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
