"""Export of a trained model to deployable files, and loading them back.

* `export_main_model`: the main model alone as a Hugging Face Llama checkpoint (config.json,
  model.safetensors, generation_config.json, tokenizer files, export_metadata.json); optionally the
  MTP tail next to it.
* `export_mtp_tail`: the MTP tail alone (mtp.safetensors + mtp_config.json), into a new directory
  or next to an exported main model.
* `load_exported_model`: (DecoderConfig, full state dict under our names) from such a directory,
  ready for `MTPLanguageModel` + `model.sharding.load_full_state_dict`.

Inputs are *full* (TP=1) state dicts named as `MTPLanguageModel.named_parameters()`. Every export
is written into a temporary directory next to `out_dir` and renamed into place, so a crash never
leaves a half-written export behind. Layout conversions live in pretrain/export/hf_llama.py, the
tail's format in pretrain/export/mtp_tail.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import sentencepiece as spm
import torch

from model.config import DecoderConfig, ModelConfig, MTPConfig
from model.mtp.objective import NO_MTP
from model.tail import TAIL_PREFIX
from pretrain.export.hf_llama import (
    check_shapes,
    from_hf_tensors,
    hf_config,
    main_shapes,
    model_config_from_hf,
    to_hf_tensors,
)
from pretrain.export.mtp_tail import (
    TAIL_CONFIG,
    TAIL_WEIGHTS,
    check_tail_tensors,
    mtp_config_from_tail,
    tail_config,
    tail_tensors,
)

EXPORT_FORMAT = "mtp-pretrain/export"
EXPORT_FORMAT_VERSION = 1
METADATA_FILE = "export_metadata.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPECIAL_KEYS = ("bos", "eos", "pad", "unk")
# Lossless round trip under identity normalisation; NFKC would fold the ligature and the
# full-width digit, whitespace squeezing the double space.
_NORMALISATION_PROBE = "a  b\tﬁ１"


# --- public API -------------------------------------------------------------------------------

def export_main_model(
    out_dir: str | os.PathLike,
    full_state_dict: dict[str, torch.Tensor],
    dcfg: DecoderConfig,
    tokenizer_model_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    special_token_ids: dict[str, int] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    include_mtp: bool = False,
) -> Path:
    """Write the main model (MTP tail dropped) as a HF Llama checkpoint into `out_dir`.

    dtype: of the written tensors (float32/bfloat16/float16); None keeps the state dict's dtype.
    special_token_ids: {"bos", "eos", "pad"} ids for config.json; by default the tokenizer's.
    metadata: JSON-serialisable provenance (source step, run, …) stored in export_metadata.json.
    include_mtp: also write the MTP tail (as `export_mtp_tail`) into the same directory, atomically.
    """
    dcfg.validate()
    check_shapes(_main_part(full_state_dict), main_shapes(dcfg), "the state dict")
    dtype = _target_dtype(full_state_dict, dtype)
    source = _json_ready(metadata, "metadata")
    tokenizer = (_tokenizer_files(tokenizer_model_path, dcfg, special_token_ids)
                 if tokenizer_model_path else None)
    ids = _special_ids(special_token_ids, tokenizer[2] if tokenizer else {},
                       dcfg.model.vocab_size)
    tail = tail_tensors(full_state_dict, dcfg) if include_mtp else None

    def write(tmp: Path) -> None:
        _write_json(tmp / "config.json", hf_config(dcfg.model, dtype, ids))
        _write_json(tmp / "generation_config.json",
                    {f"{k}_token_id": ids.get(k) for k in ("bos", "eos", "pad")})
        if tokenizer is not None:
            for name, data in tokenizer[0].items():
                (tmp / name).write_bytes(data)
            _write_json(tmp / "tokenizer_config.json", tokenizer[1])
        _save(to_hf_tensors(full_state_dict, dcfg.model), tmp / WEIGHTS_FILE, dtype)
        if tail is not None:
            _write_tail(tmp, tail, dcfg, dtype, source)
        _write_json(tmp / METADATA_FILE, {
            "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "model_config": dataclasses.asdict(dcfg.model),
            "trained_mtp_config": dataclasses.asdict(dcfg.mtp),
            "mtp_tail_included": tail is not None, "source": source})

    out = Path(out_dir)
    _refuse_non_empty(out, overwrite)
    _publish(out, write)
    return out


def export_mtp_tail(
    out_dir: str | os.PathLike,
    full_state_dict: dict[str, torch.Tensor],
    dcfg: DecoderConfig,
    dtype: torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the MTP tail alone (mtp.safetensors + mtp_config.json) into `out_dir`.

    `out_dir` may be new/empty, or an exported main model (holding config.json): the tail files
    are then added next to it (each written to a temporary name and renamed, the config last, so
    an interrupted write never leaves a usable-looking but incomplete tail). Existing tail files,
    or any other non-empty directory, are refused unless overwrite=True.
    """
    dcfg.validate()
    tail = tail_tensors(full_state_dict, dcfg)
    dtype = _target_dtype(tail, dtype)
    source = _json_ready(metadata, "metadata")
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        _refuse_non_empty(out, overwrite)
        _publish(out, lambda tmp: _write_tail(tmp, tail, dcfg, dtype, source))
        return out
    # Refuse a tail that the main model already there could not use.
    main_cfg = model_config_from_hf(_read_json(out / "config.json"), str(out / "config.json"))
    mtp_config_from_tail(tail_config(dcfg, dtype, source), main_cfg, f"the MTP tail for {out}")
    present = [n for n in (TAIL_WEIGHTS, TAIL_CONFIG) if (out / n).exists()]
    if present and not overwrite:
        raise ValueError(f"{out} already holds an MTP tail ({present}); pass overwrite=True to "
                         "replace it")
    # Drop an old config first: until the new one is in place no tail is advertised.
    (out / TAIL_CONFIG).unlink(missing_ok=True)
    _write_tail(out, tail, dcfg, dtype, source, in_place=True)
    return out


def load_exported_model(
    model_dir: str | os.PathLike, mtp_dir: str | os.PathLike | None = None
) -> tuple[DecoderConfig, dict[str, torch.Tensor]]:
    """(DecoderConfig, full state dict under our names) from an exported HF Llama main model.

    The MTP tail is read from `mtp_dir` (which must then hold one) or, if absent, from `model_dir`
    when it holds one; without a tail the config has mtp.kind 'none'. Tensors keep their stored
    dtype (loading into a model casts them).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; pass the directory written by "
                         "export_main_model")
    model_cfg = model_config_from_hf(_read_json(root / "config.json"), str(root / "config.json"))
    meta_path = root / METADATA_FILE
    if meta_path.is_file():
        # Training-only settings that a HF config has no field for.
        saved = _read_json(meta_path).get("model_config", {})
        for name in ("loss_chunk_tokens", "loss_impl", "loss_kernels"):
            if name in saved:
                setattr(model_cfg, name, saved[name])
    model_cfg.validate()
    full = from_hf_tensors(_load_hf_weights(root), model_cfg, str(root))

    tail_root = Path(mtp_dir) if mtp_dir is not None else root
    has_tail = any((tail_root / n).exists() for n in (TAIL_CONFIG, TAIL_WEIGHTS))
    if mtp_dir is not None and not has_tail:
        raise ValueError(f"{tail_root} holds no MTP tail ({TAIL_CONFIG}, {TAIL_WEIGHTS}); pass "
                         "the directory written by export_mtp_tail")
    mtp = MTPConfig(kind=NO_MTP, depth=0)
    if has_tail:
        mtp, tail = _read_tail(tail_root, model_cfg)
        full.update(tail)
    dcfg = DecoderConfig(model_cfg, mtp)
    dcfg.validate()
    return dcfg, full


# --- MTP tail files ---------------------------------------------------------------------------

def _write_tail(
    out: Path, tail: dict[str, torch.Tensor], dcfg: DecoderConfig, dtype: torch.dtype,
    source: dict[str, Any], in_place: bool = False,
) -> None:
    """Weights first, config last: the config is what marks a tail as present."""
    files = ((TAIL_WEIGHTS, lambda p: _save(tail, p, dtype)),
             (TAIL_CONFIG, lambda p: _write_json(p, tail_config(dcfg, dtype, source))))
    for name, writer in files:
        if not in_place:
            writer(out / name)
            continue
        tmp = out / f".{name}.tmp-{uuid.uuid4().hex}"
        try:
            writer(tmp)
            os.replace(tmp, out / name)
        finally:
            tmp.unlink(missing_ok=True)


def _read_tail(root: Path, main_cfg: ModelConfig) -> tuple[MTPConfig, dict[str, torch.Tensor]]:
    cfg_path, weights = root / TAIL_CONFIG, root / TAIL_WEIGHTS
    for path in (cfg_path, weights):
        if not path.is_file():
            raise ValueError(f"MTP tail in {root} is incomplete: {path.name} is missing; "
                             "re-export it with export_mtp_tail(…, overwrite=True)")
    mtp = mtp_config_from_tail(_read_json(cfg_path), main_cfg, str(cfg_path))
    tensors = safetensors.torch.load_file(weights)
    check_tail_tensors(tensors, DecoderConfig(main_cfg, mtp), str(weights))
    return mtp, tensors


# --- tokenizer --------------------------------------------------------------------------------

def _tokenizer_files(
    path: str | os.PathLike, dcfg: DecoderConfig, given_ids: dict[str, int] | None
) -> tuple[dict[str, bytes], dict[str, Any], dict[str, int]]:
    """({file name: bytes}, tokenizer_config.json, the tokenizer's special ids) for transformers:
    a sentencepiece model as tokenizer.model + LlamaTokenizer, a tokenizer.json as itself +
    PreTrainedTokenizerFast (its special tokens named by `given_ids`, the dataset's)."""
    if Path(path).suffix == ".json":
        return _fast_tokenizer_files(Path(path), dcfg, given_ids or {})
    model_bytes = Path(path).read_bytes()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except Exception as exc:  # sentencepiece raises plain RuntimeError on a bad file
        raise ValueError(f"tokenizer {path} is not a sentencepiece model: {exc}") from exc
    if sp.get_piece_size() > dcfg.model.vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.get_piece_size()} pieces but model.vocab_size "
                         f"is {dcfg.model.vocab_size}; export with the tokenizer the model was "
                         "trained with")
    if sp.decode(sp.encode(_NORMALISATION_PROBE)) != _NORMALISATION_PROBE:
        raise ValueError(f"tokenizer {path} normalises text (NFKC or whitespace squeezing); "
                         "transformers' LlamaTokenizer would encode differently. Train it with "
                         "normalization_rule_name='identity' (as `mtp prepare` does)")
    # With sentencepiece's dummy prefix, "x" encodes as "▁x"; HF must then add the space too.
    prefix_space = sp.encode("x", out_type=str)[0].startswith("\u2581")
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        # The training data has no BOS/EOS inside documents' text: encode adds neither.
        "add_bos_token": False, "add_eos_token": False,
        "add_prefix_space": prefix_space, "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": dcfg.model.max_seq_len,
    }
    ids = {k: i for k, i in ids.items() if i >= 0}  # -1: the tokenizer has no such token
    config.update({f"{k}_token": sp.id_to_piece(i) for k, i in ids.items()})
    return {"tokenizer.model": model_bytes}, config, ids


def _fast_tokenizer_files(
    path: Path, dcfg: DecoderConfig, given_ids: dict[str, int]
) -> tuple[dict[str, bytes], dict[str, Any], dict[str, int]]:
    from tokenizers import Tokenizer

    data = path.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode())
    except Exception as exc:  # tokenizers raises plain Exception subclasses on a bad file
        raise ValueError(f"tokenizer {path} is not a tokenizers JSON file: {exc}") from exc
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > dcfg.model.vocab_size:
        raise ValueError(f"tokenizer {path} has {size} tokens but model.vocab_size is "
                         f"{dcfg.model.vocab_size}; export with the tokenizer the model was "
                         "trained with")
    ids = {k: i for k, i in given_ids.items() if i is not None and tok.id_to_token(i) is not None}
    config: dict[str, Any] = {
        # transformers >= 4 loads this class from tokenizer.json alone (5.x maps it onto its
        # tokenizers backend). The training data holds no special tokens the encoder would add.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": dcfg.model.max_seq_len,
    }
    config.update({f"{k}_token": tok.id_to_token(i) for k, i in ids.items()})
    return {"tokenizer.json": data}, config, ids


def _special_ids(
    given: dict[str, int] | None, tokenizer_ids: dict[str, int], vocab: int
) -> dict[str, int]:
    ids = dict(tokenizer_ids)
    for key, value in (given or {}).items():
        if key not in SPECIAL_KEYS:
            raise ValueError(f"special_token_ids key {key!r} is unknown; use {SPECIAL_KEYS}")
        if not isinstance(value, int) or not 0 <= value < vocab:
            raise ValueError(f"special_token_ids[{key!r}] = {value!r} is not a token id in "
                             f"[0, {vocab})")
        if key in ids and ids[key] != value:
            raise ValueError(f"special_token_ids[{key!r}] = {value} but the tokenizer's {key} id "
                             f"is {ids[key]}; drop the override or use the matching tokenizer")
        ids[key] = value
    return ids


# --- files ------------------------------------------------------------------------------------

def _main_part(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in full.items() if not n.startswith(TAIL_PREFIX)}


def _target_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        found = {t.dtype for t in tensors.values()}
        if len(found) != 1:
            raise ValueError(f"the state dict mixes dtypes {sorted(map(str, found))}; choose the "
                             "exported one (dtype=, or `mtp export --dtype`)")
        dtype = found.pop()
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype} cannot be exported; use one of {DTYPES}")
    return dtype


def _save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    # Own contiguous copies: safetensors refuses views that share storage (q/k/v of one QKV).
    ready = {n: t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
             for n, t in tensors.items()}
    # "format: pt" is what transformers checks before loading a safetensors file.
    safetensors.torch.save_file(ready, str(path), metadata={"format": "pt"})


def _load_hf_weights(root: Path) -> dict[str, torch.Tensor]:
    if (root / WEIGHTS_FILE).is_file():
        return safetensors.torch.load_file(root / WEIGHTS_FILE)
    if (root / WEIGHTS_INDEX).is_file():  # sharded checkpoints as transformers writes them
        weight_map = _read_json(root / WEIGHTS_INDEX).get("weight_map", {})
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (root / shard).is_file():
                raise ValueError(f"{root / WEIGHTS_INDEX} names {shard}, which is missing")
            out.update(safetensors.torch.load_file(root / shard))
        return out
    raise ValueError(f"{root} holds neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}; the export is "
                     "incomplete or this is not a model directory")


def _json_ready(value: dict[str, Any] | None, name: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(value or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable ({exc}); pass plain numbers, strings, "
                         "lists and dicts") from exc


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} is missing; pass a directory written by this project's export")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return obj


def _refuse_non_empty(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {out} is not empty; pass overwrite=True to replace it or "
                         "choose a new directory")


def _publish(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write` into a fresh directory next to `out`, then move it into place.

    The rename is atomic; replacing a non-empty `out` takes two renames (old away, new in), and
    the old copy is deleted only after the new one is in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the export private to this user
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
        os.rename(out, old)
    try:
        os.replace(tmp, out)  # an empty `out` directory is replaced atomically
    except BaseException:
        if old is not None:
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
