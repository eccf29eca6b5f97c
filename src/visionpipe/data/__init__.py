"""The prepare-dataset stage: sources, validation, manifests and loading of image datasets.

Names are imported lazily: the serving model imports ``visionpipe.data.images`` and must not pay
for (or depend on) boto3, pandas and scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from visionpipe.errors import DatasetError
    from visionpipe.data.images import MEAN, STD, normalize, open_image, to_uint8_tensor
    from visionpipe.data.loading import ManifestImageDataset, build_loader, load_split
    from visionpipe.data.manifest import dataset_version, read_manifest
    from visionpipe.data.prepare import PreparedDataset, prepare_dataset, source_fingerprint

_EXPORTS = {
    "DatasetError": "visionpipe.errors",
    "MEAN": "images",
    "STD": "images",
    "normalize": "images",
    "open_image": "images",
    "to_uint8_tensor": "images",
    "ManifestImageDataset": "loading",
    "build_loader": "loading",
    "load_split": "loading",
    "dataset_version": "manifest",
    "read_manifest": "manifest",
    "PreparedDataset": "prepare",
    "prepare_dataset": "prepare",
    "source_fingerprint": "prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if "." in module else f"visionpipe.data.{module}"), name)
