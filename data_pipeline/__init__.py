"""Data pipeline: tokenizer + packed webdataset token shards (build) and the MTP batch loader.

Build: `build_dataset(BuildConfig(...))` -> `Manifest`. Read: `ShardLoader(manifest, split, ...)`
yields {input_ids [B,T], labels [B,D+1,T], loss_mask [B,D+1,T]}; `make_mtp_labels` does the
label construction on any [B, L] window tensor.
"""

from .build import build_dataset, document_order, split_validation
from .config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID, BuildConfig, BuildConfigError
from .labels import make_mtp_labels
from .loader import ShardLoader
from .manifest import Manifest, ShardError, ShardInfo, load_manifest
from .pinned_code import PINNED_CODE, PinnedDistribution, prepare_pinned_code

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_IDS", "UNK_ID", "PINNED_CODE",
    "BuildConfig", "BuildConfigError", "Manifest", "PinnedDistribution", "ShardError", "ShardInfo", "ShardLoader",
    "build_dataset", "document_order", "load_manifest", "make_mtp_labels", "prepare_pinned_code",
    "split_validation",
]
