"""Moving a model between training state and files, in one package.

* `from_checkpoint`: a training checkpoint of any layout → the full (TP = 1) parameter dict.
* `hf_llama`: our parameter names and layouts ↔ a Hugging Face Llama checkpoint's (pure tensors).
* `mtp_tail`: the format of the MTP tail exported beside the main model (its config and tensors).
* `files`: writing export directories atomically, and reading them back.
* `loading`: a model ready for inference from an export or a training run.

The `mtp export` command (pretrain/commands/export.py) only parses flags and calls these.
"""
