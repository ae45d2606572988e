"""Read + decode + tokenize documents in a process pool, results in listing order.

`Pool.imap` returns chunks in submission order, so the token stream (and every shard built from
it) is identical for any number of processes.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .sources import DocRef, read_document
from .tokenizer import TextTokenizer

# Documents per task: large enough to amortise pickling, small enough to balance the pool.
_DOCS_PER_TASK = 16


@dataclass
class EncodedDoc:
    ref: DocRef
    tokens: np.ndarray | None  # without the EOS separator; None if skipped
    skip_reason: str | None
    n_bytes: int


# Per-process state of pool workers (set by the initializer; a pool process serves one build).
_worker_state: dict = {}


def _init_worker(kind: str, model_bytes: bytes, jsonl_field: str, dtype: str) -> None:
    _worker_state["sp"] = TextTokenizer(kind, model_bytes)
    _worker_state["field"] = jsonl_field
    _worker_state["dtype"] = np.dtype(dtype)


def _encode_chunk(refs: list[DocRef]) -> list[tuple[np.ndarray | None, str | None, int]]:
    sp, field, dtype = _worker_state["sp"], _worker_state["field"], _worker_state["dtype"]
    out = []
    for ref in refs:
        text, reason = read_document(ref, field)
        if text is None:
            out.append((None, reason, 0))
            continue
        out.append((np.asarray(sp.encode(text), dtype=dtype), None, len(text.encode("utf-8"))))
    return out


def encode_documents(refs: list[DocRef], model_bytes: bytes, jsonl_field: str, dtype: str,
                     num_workers: int, kind: str = "sentencepiece") -> Iterator[EncodedDoc]:
    """Yield one `EncodedDoc` per ref, in the order of `refs` (`kind`: of the tokenizer bytes,
    see data_pipeline/tokenizer.py)."""
    chunks = [refs[i:i + _DOCS_PER_TASK] for i in range(0, len(refs), _DOCS_PER_TASK)]
    init = (kind, model_bytes, jsonl_field, dtype)
    if num_workers <= 1:
        _init_worker(*init)
        results = map(_encode_chunk, chunks)
        yield from _flatten(chunks, results)
        return
    # forkserver, not fork: the caller may have threads (tqdm's monitor, torch's pools, a
    # process group) holding locks at fork time, and a forked worker then deadlocks on them
    # (seen in CI). The server process is started once per caller and forks clean workers.
    ctx = mp.get_context("forkserver")
    # The server imports this module (and with it torch, through webdataset) once; workers fork
    # from it instead of each importing it again. Sixteen workers importing torch at once from a
    # fresh, uncompiled install took minutes on the GPU machines.
    ctx.set_forkserver_preload(["__main__", __name__])  # "__main__": the default, kept
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=init) as pool:
        yield from _flatten(chunks, pool.imap(_encode_chunk, chunks))


def _flatten(chunks, results) -> Iterator[EncodedDoc]:
    for chunk, res in zip(chunks, results, strict=True):
        for ref, (tokens, reason, n_bytes) in zip(chunk, res, strict=True):
            yield EncodedDoc(ref, tokens, reason, n_bytes)
