import gzip
import struct

import numpy as np
import pytest
import torch
from idx_files import idx_bytes

from msfp.data import DEFAULT_DATA_DIR, load_fashion_mnist, to_model_range


def write_split(d, n=3, gz=True, images=None, labels=None):
    images = idx_bytes(np.arange(n * 28 * 28, dtype=np.uint8).reshape(n, 28, 28)) if images is None else images
    labels = idx_bytes(np.arange(n, dtype=np.uint8) % 10) if labels is None else labels
    for stem, raw in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        if gz:
            (d / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (d / stem).write_bytes(raw)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_fake_idx_files(tmp_path, gz):
    write_split(tmp_path, n=3, gz=gz)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (3, 28, 28) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2] and y.dtype == torch.long
    assert x[0, 0, 1] == 1


def test_missing_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist.*dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\[.gz\] not found"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_fashion_mnist("val", tmp_path)


def test_truncated_and_malformed_files(tmp_path):
    good = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    write_split(tmp_path, images=good[:-10])
    with pytest.raises(ValueError, match=r"announces shape \(3, 28, 28\).*truncated"):
        load_fashion_mnist("test", tmp_path)
    # Dimensions whose product wraps around to 0 in int64: numpy then failed to reshape the empty remainder.
    write_split(tmp_path, images=good[:4] + struct.pack(">3I", 2**31, 2**31, 4))
    with pytest.raises(ValueError, match=r"\(2147483648, 2147483648, 4\) \(18446744073709551632 bytes\).*has 16 bytes"):
        load_fashion_mnist("test", tmp_path)
    write_split(tmp_path, images=b"\x00\x00\x0d\x03" + good[4:])  # float32 IDX type code
    with pytest.raises(ValueError, match="bad magic number"):
        load_fashion_mnist("test", tmp_path)
    write_split(tmp_path, images=idx_bytes(np.zeros((3, 784), dtype=np.uint8)))
    with pytest.raises(ValueError, match="2 dimensions, expected 3"):
        load_fashion_mnist("test", tmp_path)
    write_split(tmp_path, labels=idx_bytes(np.zeros(2, dtype=np.uint8)))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_fashion_mnist("test", tmp_path)
    # Content that is not Fashion-MNIST's: the training scripts used to train on 36x36 images padded from 32x32.
    write_split(tmp_path, images=idx_bytes(np.zeros((3, 32, 32), dtype=np.uint8)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: images are 32x32, expected 28x28"):
        load_fashion_mnist("test", tmp_path)
    write_split(tmp_path, images=idx_bytes(np.zeros((0, 28, 28), dtype=np.uint8)),
                labels=idx_bytes(np.zeros(0, dtype=np.uint8)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: the file holds no images"):
        load_fashion_mnist("test", tmp_path)
    write_split(tmp_path, labels=idx_bytes(np.array([0, 200, 9], dtype=np.uint8)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: label 200 found, expected 0 to 9"):
        load_fashion_mnist("test", tmp_path)
    write_split(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:-20])  # cut-off gzip stream
    with pytest.raises(ValueError, match="cannot read IDX file"):
        load_fashion_mnist("test", tmp_path)
    damaged = bytearray(gzip.compress(good))
    damaged[10] ^= 0xFF  # the deflate stream's first block header: zlib.error, which used to escape as is
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: cannot read IDX file \(Error -3"):
        load_fashion_mnist("test", tmp_path)


def test_to_model_range():
    x = to_model_range(torch.tensor([[[0, 255] * 14] * 28], dtype=torch.uint8))
    assert x.shape == (1, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and torch.bincount(y).tolist() == [1000] * 10
