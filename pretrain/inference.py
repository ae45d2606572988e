"""What `mtp generate` and `mtp eval` share: loading a model with its problems reported in the
commands' terms, writing their --json files, and fitting decoding lengths to the model's context.

Lengths: a decode needs prompt + new tokens + 1 positions (plain) or + 2·drafts + 2 (self-
speculative with that many drafts a round; model/generation/runner.py, `positions_needed`), all within model.max_seq_len. A
length the user gave is honoured or refused; a default is clipped to what fits, and the clip is
printed (as a note, once the command's checks have passed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pretrain.errors import UsageError

DEFAULT_PROMPT_LEN = 64
DEFAULT_NEW_TOKENS = 64
DRAFT_COUNT_TOKENS = 20_000_000
"""Tokens of a dataset's training split counted to rank the vocabulary for --draft-vocab (a few
seconds from local shards)."""


def load_model(path: str, dtype=None):
    """`load_for_inference`, with a path that holds no usable model as a UsageError."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.export.loading import ModelLoadError, load_for_inference

    try:
        return load_for_inference(path, dtype)
    except (ModelLoadError, CheckpointError) as err:
        raise UsageError(str(err)) from None


def check_output_file(path: str | None, flag: str = "--json") -> None:
    """Refuse an output file that cannot be written before any work (not after it)."""
    if path is None:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist; create it or "
                         "choose another path")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{flag} {path} is not writable; choose another path")


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def note(command: str, text: str) -> None:
    print(f"mtp {command}: note: {text}", file=sys.stderr, flush=True)


def _positions(drafts: int | None) -> tuple[int, str]:
    """Positions a decode needs beyond prompt + new tokens, and how to say it."""
    from model.generation.runner import positions_needed

    extra = positions_needed(0, 0, drafts)
    return extra, ("1" if drafts is None else f"2·drafts + 2 ({extra})")


def fit_new_tokens(notes: list[str], prompt_len: int, new_tokens: int | None, max_seq_len: int,
                   drafts: int | None, flag: str = "--max-new-tokens",
                   prompt: str | None = None, shorten: str | None = None) -> int:
    """New tokens to decode after prompts of up to `prompt_len` tokens (`drafts`: the drafts a
    self-speculative round verifies, None for plain). `new_tokens` None: the default, clipped, and
    the clip appended to `notes` (the command prints them once all its checks have passed).
    `prompt`, `shorten`: how the messages name the prompt and the way to shorten it."""
    extra, said = _positions(drafts)
    room = max_seq_len - prompt_len - extra
    prompt = prompt or f"the longest prompt ({prompt_len} token{'' if prompt_len == 1 else 's'})"
    if room < 1:
        shorten = shorten or f"shorten it to {max_seq_len - extra - 1} tokens or fewer"
        raise UsageError(f"{prompt} + {said} positions for decoding leave no room for new tokens "
                         f"in model.max_seq_len = {max_seq_len}; {shorten}")
    if new_tokens is None:
        if room < DEFAULT_NEW_TOKENS:
            notes.append(f"{flag} {room} (not {DEFAULT_NEW_TOKENS}): {prompt} + {said} leave "
                         f"{room} of model.max_seq_len = {max_seq_len}")
        return min(DEFAULT_NEW_TOKENS, room)
    if new_tokens > room:
        raise UsageError(
            f"{flag} {new_tokens} does not fit: {prompt} + {new_tokens} + {said} = "
            f"{prompt_len + new_tokens + extra} > model.max_seq_len = {max_seq_len}; use {flag} "
            f"{room} or less, or a shorter prompt")
    return new_tokens


def fit_prompt_and_new_tokens(notes: list[str], prompt_len: int | None, new_tokens: int | None,
                              max_seq_len: int, drafts: int, data_seq_len: int) -> tuple[int, int]:
    """`mtp eval`'s held-out prompts (cut from windows of `data_seq_len` tokens) and the tokens
    decoded after them, self-speculatively with `drafts` drafts a round. None: the default, clipped
    (the room is shared evenly when both are defaults)."""
    extra, said = _positions(drafts)
    budget = max_seq_len - extra  # prompt + new tokens
    if budget < 2:
        raise UsageError(f"model.max_seq_len = {max_seq_len} leaves no room for a prompt and a "
                         f"new token besides the {said} positions that decoding with drafts "
                         "needs; this model cannot be evaluated by decoding")
    if prompt_len is not None and prompt_len > data_seq_len:
        raise UsageError(f"--prompt-len {prompt_len} is longer than the dataset's windows "
                         f"(seq_len {data_seq_len}); use --prompt-len {data_seq_len} or less")
    if prompt_len is not None and new_tokens is not None:
        if prompt_len + new_tokens > budget:
            raise UsageError(
                f"--prompt-len {prompt_len} + --new-tokens {new_tokens} + {said} = "
                f"{prompt_len + new_tokens + extra} > model.max_seq_len = {max_seq_len}; make "
                f"the two add up to {budget} or less")
        return prompt_len, new_tokens
    if prompt_len is not None:
        return prompt_len, fit_new_tokens(
            notes, prompt_len, None, max_seq_len, drafts, "--new-tokens",
            prompt=f"--prompt-len {prompt_len}", shorten=f"use --prompt-len {budget - 1} or less")
    if new_tokens is not None:
        if new_tokens > budget - 1:
            raise UsageError(
                f"--new-tokens {new_tokens} + {said} leaves no room for a prompt in "
                f"model.max_seq_len = {max_seq_len}; use --new-tokens {budget - 1} or less")
        prompt = min(DEFAULT_PROMPT_LEN, data_seq_len, budget - new_tokens)
        if prompt < min(DEFAULT_PROMPT_LEN, data_seq_len):
            notes.append(f"--prompt-len {prompt} (not {DEFAULT_PROMPT_LEN}): it + --new-tokens "
                         f"{new_tokens} + {said} fill model.max_seq_len = {max_seq_len}")
        return prompt, new_tokens
    new = min(DEFAULT_NEW_TOKENS, budget // 2)
    prompt = min(DEFAULT_PROMPT_LEN, data_seq_len, budget - new)
    if new < DEFAULT_NEW_TOKENS or prompt < min(DEFAULT_PROMPT_LEN, data_seq_len):
        notes.append(f"--prompt-len {prompt} --new-tokens {new} (not {DEFAULT_PROMPT_LEN} and "
                     f"{DEFAULT_NEW_TOKENS}): with {said} positions for decoding they fill "
                     f"model.max_seq_len = {max_seq_len}")
    return prompt, new


def draft_vocab_ids(manifest, vocab_size: int, sizes: list[int], flag: str) -> list:
    """For each K in `sizes`, the ids of the K most frequent tokens of `manifest`'s training
    split ([K] tensors), for a model of `vocab_size` tokens (which may be padded beyond the
    dataset's). `flag` names the dataset in errors."""
    import torch

    from data_pipeline.token_counts import count_tokens
    from model.generation.draft_vocab import most_frequent

    if manifest.vocab_size > vocab_size:
        raise UsageError(f"{flag} {manifest.root} has a vocabulary of {manifest.vocab_size} "
                         f"tokens, more than the model's {vocab_size}: give the dataset the model "
                         "was trained on (or one prepared with its tokenizer)")
    for k in sizes:
        if k > manifest.vocab_size:
            raise UsageError(f"--draft-vocab {k} exceeds the vocabulary of {flag} "
                             f"({manifest.vocab_size}); give K < {manifest.vocab_size}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    counts[: manifest.vocab_size] = torch.from_numpy(count_tokens(manifest, DRAFT_COUNT_TOKENS))
    return [most_frequent(counts, k) for k in sizes]
