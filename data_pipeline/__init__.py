"""Data pipeline: tokenizer + packed webdataset token shards (build) and the MTP batch loader.

Build: `build_dataset(BuildConfig(...))` -> `Manifest`. Read: `ShardLoader(manifest, split, ...)`
yields {input_ids [B,T], labels [B,D+1,T], loss_mask [B,D+1,T]}; `make_mtp_labels` does the
label construction on any [B, L] window tensor.
"""

from .build import build_dataset, document_order, split_validation
from .config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID, BuildConfig, BuildConfigError
from .labels import document_ids, make_mtp_labels
from .loader import ShardLoader
from .manifest import Manifest, ShardError, ShardInfo, load_manifest
from .mixture import DataSource, SampleMix
from .pinned_code import PINNED_CODE, PinnedDistribution, prepare_pinned_code
from .remote import RemoteError, RemoteOptions

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "SPECIAL_IDS", "UNK_ID", "PINNED_CODE",
    "BuildConfig", "BuildConfigError", "DataSource", "Manifest", "PinnedDistribution",
    "RemoteError", "RemoteOptions", "SampleMix", "ShardError", "ShardInfo", "ShardLoader",
    "build_dataset", "document_ids", "document_order", "load_manifest", "make_mtp_labels",
    "prepare_pinned_code",
    "split_validation",
]
