"""Fashion-MNIST loading for the shipped default model and its feature network.

The data comes from Debian's ``dataset-fashion-mnist`` package (gzipped IDX files) or from any directory holding
the four IDX files, gzipped or not. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "Install Debian's package (`apt-get install dataset-fashion-mnist`, files land in "
    f"{DEFAULT_DATA_DIR}) or pass a directory holding the four Fashion-MNIST IDX files."
)
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {data_dir}. {_HOW_TO_GET}")


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a damaged gzip stream raises zlib.error
        raise ValueError(f"{path}: cannot read IDX file ({e}). {_HOW_TO_GET}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number). {_HOW_TO_GET}")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}.")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = header + math.prod(shape)  # exact: np.prod wraps around in int64 for a corrupt header's huge dimensions
    if len(raw) != size:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({size} bytes) but the file has "
            f"{len(raw)} bytes (truncated or corrupted)."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None):
    """Return ``(images, labels)``: uint8 tensors of shape (N, 28, 28) and (N,)."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_FILES)}")
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory {data_dir} does not exist. {_HOW_TO_GET}")
    img_path, lbl_path = (_find(data_dir, stem) for stem in _FILES[split])
    images, labels = _read_idx(img_path, 3), _read_idx(lbl_path, 1)
    # The models and the feature network expect 28x28 padded to 32x32: other sizes would train silently on them.
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28 (Fashion-MNIST).")
    if len(images) == 0:
        raise ValueError(f"{img_path}: the file holds no images.")
    if len(images) != len(labels):
        raise ValueError(f"{data_dir}: {len(images)} images but {len(labels)} labels in the {split} split.")
    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{lbl_path}: label {labels.max()} found, expected 0 to {len(CLASS_NAMES) - 1} "
                         "(the Fashion-MNIST classes).")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()).long()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) → float (N, 1, 32, 32) in [-1, 1], zero-padded by 2 pixels (the background is -1)."""
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
