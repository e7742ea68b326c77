"""Fashion-MNIST IDX files written by tests (nothing downloads at test time)."""

import struct
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).parent / "data" / "fashion_mnist_test256.npz"  # 256 real test images and their labels


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion_mnist(directory: Path) -> Path:
    """Both splits, each the 256 shipped test images: enough for the scripts' flows, not for their results."""
    with np.load(SAMPLE) as sample:
        images, labels = idx_bytes(sample["images"]), idx_bytes(sample["labels"])
    for prefix in ("train", "t10k"):
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(images)
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    return directory
