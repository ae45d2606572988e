"""`build_dataset`: corpus -> tokenizer -> packed windows -> webdataset shards + manifest."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import (
    PINNED_CODE_SOURCE,
    STDLIB_SOURCE,
    BuildConfig,
    BuildConfigError,
)
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, Manifest, load_manifest, write_manifest
from .pinned_code import prepare_pinned_code
from .shard_writer import SAMPLE_MEMBER, ShardSetWriter, WindowPacker, file_sha256
from .sources import (
    SKIP_REASONS,
    DocRef,
    corpus_fingerprint,
    list_directory,
    list_jsonl,
    list_stdlib,
    read_document,
    stdlib_root,
)
from .tokenize_parallel import encode_documents
from .tokenizer import TOKENIZER_FILES, TokenizerSpec, read_tokenizer, train_tokenizer, trained_spec

_SKIP_EXAMPLES = 5


def resolve_source(config: BuildConfig) -> tuple[list[DocRef], dict]:
    """List the documents of `config.source`; returns (refs, description for the manifest)."""
    src = config.source
    if src == STDLIB_SOURCE:
        return list_stdlib(), {"kind": "stdlib", "path": str(stdlib_root()),
                               "python": platform.python_version()}
    if src == PINNED_CODE_SOURCE:
        root, stats = prepare_pinned_code(config.download_root, progress=config.progress)
        return list_directory(root, ("**/*.py",)), {"kind": "pinned-code", "path": str(root),
                                                    "distributions": stats}
    path = Path(src)
    if path.is_dir():
        return list_directory(path, config.include), {"kind": "directory", "path": str(path.resolve()),
                                                      "include": list(config.include)}
    if path.is_file() and path.suffix == ".jsonl":
        return list_jsonl(path), {"kind": "jsonl", "path": str(path.resolve()),
                                  "field": config.jsonl_field}
    raise BuildConfigError("source", src, f"is neither '{STDLIB_SOURCE}', '{PINNED_CODE_SOURCE}', "
                           "an existing directory nor an existing .jsonl file",
                           "check the path (a .jsonl file must end in .jsonl)")


def _rank_key(seed: int, purpose: str, name: str) -> bytes:
    return hashlib.sha256(f"{seed}:{purpose}:{name}".encode()).digest()


def split_validation(refs: list[DocRef], fraction: float, seed: int) -> set[str]:
    """Names of the held-out documents: the first round(fraction*N) (at least 1) by seeded hash.

    Hash ranking depends only on (seed, name), so it is stable under reordering and parallelism.
    """
    if fraction <= 0:
        return set()
    n_val = max(1, round(fraction * len(refs)))
    if n_val >= len(refs):
        raise ValueError(f"BuildConfig.val_fraction = {fraction} leaves no training documents out of "
                         f"{len(refs)}; lower it or add documents")
    ranked = sorted(refs, key=lambda r: _rank_key(seed, "val", r.name))
    return {r.name for r in ranked[:n_val]}


def document_order(refs: list[DocRef], seed: int) -> list[DocRef]:
    """The order in which documents are written: by seeded hash of the name.

    Sources list files by path, i.e. project by project; written in that order, each shard would
    hold one project, and the loader's shuffle buffer (a few shards) would feed the model one
    project at a time, a distribution shift every few hundred steps. Hash order mixes them, and
    like the split it depends only on (seed, name), not on listing order or worker count.
    """
    return sorted(refs, key=lambda r: _rank_key(seed, "order", r.name))


def _tokenizer_sample(refs: list[DocRef], config: BuildConfig) -> tuple[list[str], int]:
    """A seeded sample of training documents up to tokenizer_sample_bytes; (texts, bytes)."""
    texts, total = [], 0
    ranked = sorted(refs, key=lambda r: _rank_key(config.seed, "tokenizer", r.name))
    bar = tqdm(total=min(config.tokenizer_sample_bytes, 1 << 62), unit="B", unit_scale=True,
               desc="tokenizer sample", disable=not config.progress)
    for ref in ranked:
        if total >= config.tokenizer_sample_bytes:
            break
        text, _ = read_document(ref, config.jsonl_field)
        if text is None:
            continue  # counted once, by the tokenization pass
        texts.append(text)
        n = len(text.encode("utf-8"))
        total += n
        bar.update(n)
    bar.close()
    return texts, total


def _known_output(name: str) -> bool:
    return name in (MANIFEST_NAME, *TOKENIZER_FILES.values()) or name.endswith((".tar", ".partial"))


def _check_out_dir(config: BuildConfig, fingerprint: str) -> Manifest | None:
    """Returns the existing manifest if it is up to date; refuses to clobber anything else."""
    out = config.out_dir
    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildConfigError("out_dir", str(out), "exists and is not a directory",
                               "choose a directory path")
    existing = None
    if (out / MANIFEST_NAME).exists():
        try:
            existing = load_manifest(out, check_files=True)
        except ValueError:
            existing = None  # incomplete or damaged: treated as "a different dataset" below
    if existing is not None and existing.fingerprint == fingerprint:
        existing.status = "up-to-date"
        return existing
    # `downloads` holds the pinned-code cache by default and may live in the dataset dir.
    others = [p.name for p in out.iterdir() if p.name != "downloads"]
    if not others:
        return None
    if not config.overwrite:
        what = ("a different dataset (other inputs or settings)" if (out / MANIFEST_NAME).exists()
                else f"other files ({', '.join(sorted(others)[:3])}...)")
        raise BuildConfigError("out_dir", str(out), f"already holds {what}",
                               "use {overwrite} to replace it, or choose another {out_dir}")
    for name in others:
        if _known_output(name) and (out / name).is_file():
            (out / name).unlink()
    return None


def build_dataset(config: BuildConfig) -> Manifest:
    """Build (or confirm up to date) the dataset described by `config`; returns its manifest.

    The result's `status` is "built" or "up-to-date". Raises ValueError for user errors.
    """
    refs, source_info = resolve_source(config)
    if not refs:
        raise ValueError(f"empty corpus: source {config.source!r} (include {list(config.include)}) "
                         f"matched no documents; check the path and the --include globs")
    reused = None
    if config.tokenizer_path is not None:
        reused = _reused_tokenizer(config)
    fingerprint = hashlib.sha256(json.dumps({
        "format_version": FORMAT_VERSION, "settings": config.fingerprint_fields(),
        "source_kind": source_info["kind"], "corpus": corpus_fingerprint(refs),
        "document_order": "seeded-hash",
        "tokenizer": hashlib.sha256(reused.data).hexdigest() if reused else None,
        "special_ids": reused.special_ids if reused else None,
    }, sort_keys=True).encode()).hexdigest()
    up_to_date = _check_out_dir(config, fingerprint)
    if up_to_date is not None:
        return up_to_date
    config.out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, ShardSetWriter] = {}
    try:
        return _build(config, refs, source_info, fingerprint, reused, writers)
    except BaseException:
        # Leave no half-built dataset behind (it would block the next run).
        for w in writers.values():
            for s in w.shards:
                (config.out_dir / s["name"]).unlink(missing_ok=True)
        for p in config.out_dir.glob(".*.partial"):
            p.unlink()
        raise


def _reused_tokenizer(config: BuildConfig) -> TokenizerSpec:
    spec = read_tokenizer(config.tokenizer_path, config.eos_token)
    if config.vocab_size is not None and spec.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer {config.tokenizer_path} has vocab size {spec.vocab_size} but "
                         f"vocab_size={config.vocab_size} was requested; pass --vocab-size "
                         f"{spec.vocab_size} (or leave it out) or train a new tokenizer")
    if config.add_bos and spec.special_ids["bos"] is None:
        raise ValueError(f"--add-bos: tokenizer {config.tokenizer_path} has no BOS token")
    return spec


def _build(config: BuildConfig, refs: list[DocRef], source_info: dict, fingerprint: str,
           reused: TokenizerSpec | None, writers: dict[str, ShardSetWriter]) -> Manifest:
    val_names = split_validation(refs, config.val_fraction, config.seed)
    if reused is not None:
        spec, tok_info = reused, {"trained": False, "source": str(config.tokenizer_path)}
    else:
        texts, sample_bytes = _tokenizer_sample([r for r in refs if r.name not in val_names], config)
        if not texts:
            raise ValueError(f"no readable training documents in {config.source!r} to train the "
                             f"tokenizer on (all files unreadable, not UTF-8 or empty)")
        spec = trained_spec(train_tokenizer(texts, config.vocab_size))
        assert spec.vocab_size == config.vocab_size, (spec.vocab_size, config.vocab_size)
        tok_info = {"trained": True, "model_type": "bpe", "byte_fallback": True,
                    "sample_documents": len(texts), "sample_bytes": sample_bytes,
                    "sample_limit_bytes": config.tokenizer_sample_bytes,
                    "sample_from": "training split, seeded hash order"}
        del texts
    dtype = np.dtype("uint16" if spec.vocab_size <= 65535 else "uint32")
    for split in ("train", "val"):
        writers[split] = ShardSetWriter(config.out_dir, split, config.shard_samples, dtype)
    packers = {s: WindowPacker(config.window_len, config.seq_len, dtype) for s in writers}
    stats = {s: {"documents": 0, "tokens": 0, "text_bytes": 0} for s in writers}
    skipped = {r: 0 for r in SKIP_REASONS}
    examples: dict[str, list[str]] = {}
    eos = np.array([spec.special_ids["eos"]], dtype=dtype)
    bos = np.array([spec.special_ids["bos"]] if config.add_bos else [], dtype=dtype)
    workers = config.num_workers or os.cpu_count() or 1
    bar = tqdm(total=len(refs), unit="doc", desc=f"tokenize ({workers} proc)",
               disable=not config.progress)
    for doc in encode_documents(document_order(refs, config.seed), spec.data,
                                config.jsonl_field, dtype.name, workers, spec.kind):
        bar.update(1)
        if doc.tokens is None:
            skipped[doc.skip_reason] += 1
            examples.setdefault(doc.skip_reason, [])
            if len(examples[doc.skip_reason]) < _SKIP_EXAMPLES:
                examples[doc.skip_reason].append(doc.ref.name)
            continue
        split = "val" if doc.ref.name in val_names else "train"
        st = stats[split]
        st["documents"] += 1
        st["tokens"] += len(bos) + len(doc.tokens) + 1
        st["text_bytes"] += doc.n_bytes
        for window in packers[split].add(np.concatenate([bos, doc.tokens, eos])):
            writers[split].write(window)
    bar.close()
    total_docs = stats["train"]["documents"] + stats["val"]["documents"]
    if total_docs == 0:
        raise ValueError(f"no usable documents in {config.source!r}: {len(refs)} listed, all "
                         f"skipped ({ {k: v for k, v in skipped.items() if v} })")
    splits = {}
    for split, w in writers.items():
        shards = w.close()
        st = stats[split]
        if split == "train" or st["documents"]:
            if w.num_samples == 0:
                fix = ("raise --val-fraction or set it to 0" if split == "val"
                       else "lower --seq-len/--max-depth or add data")
                raise ValueError(f"the {split} split has {st['tokens']} tokens "
                                 f"({st['documents']} documents), fewer than one window of "
                                 f"seq_len + max_depth + 1 = {config.window_len} tokens; {fix}")
        splits[split] = {**st, "windows": w.num_samples, "dropped_tail_tokens": packers[split].leftover,
                         "shards": shards}
    tok_path = config.out_dir / spec.file_name
    tok_path.write_bytes(spec.data)
    data = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "build_fingerprint": fingerprint,
        "source": {**source_info, "documents_listed": len(refs)},
        "settings": config.fingerprint_fields(),
        "tokenizer": {"path": spec.file_name, "kind": spec.kind, "sha256": file_sha256(tok_path),
                      "special_tokens": spec.special_tokens, **tok_info},
        "vocab_size": spec.vocab_size, "special_ids": spec.special_ids,
        "seq_len": config.seq_len, "max_depth": config.max_depth, "window_len": config.window_len,
        "stride": config.seq_len, "dtype": dtype.name,
        "sample_encoding": f"tar member '<9-digit index>.{SAMPLE_MEMBER}': window_len raw "
                           f"little-endian {dtype.name} values",
        "document_separator": ("bos_id before and eos_id after every document" if config.add_bos
                               else "eos_id appended after every document; no bos"),
        "val_fraction": config.val_fraction, "seed": config.seed,
        "skipped": {**skipped, "examples": examples},
        "splits": splits, "notes": config.extra,
    }
    write_manifest(config.out_dir, data)
    m = load_manifest(config.out_dir, check_files=True)
    m.status = "built"
    return m
