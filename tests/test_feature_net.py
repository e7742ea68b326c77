from pathlib import Path

import numpy as np
import pytest
import torch

from msfp.data import to_model_range
from msfp.feature_net import FEATURE_NET_DIR, FeatureNet, compute_features, load_feature_net, load_reference_stats

DATA = Path(__file__).parent / "data" / "fashion_mnist_test256.npz"
needs_assets = pytest.mark.skipif(not (FEATURE_NET_DIR / "model.safetensors").is_file(),
                                  reason=f"feature network not trained yet ({FEATURE_NET_DIR} missing)")


def test_architecture_shapes():
    net = FeatureNet(feature_dim=16).eval()
    x = torch.zeros(3, 1, 32, 32)
    assert net.features(x).shape == (3, 16) and net.logits(x).shape == (3, 10)
    x = torch.randn(7, 1, 32, 32)
    feats, logits = compute_features(net, x, batch_size=3)
    assert feats.shape == (7, 16) and logits.shape == (7, 10)
    torch.testing.assert_close(feats, net.features(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, net.logits(x), atol=1e-5, rtol=1e-5)
    # A net left in training mode: its batch norm used each batch's statistics and updated its running ones.
    net.train()
    net.classifier.eval()
    running = {k: v.clone() for k, v in net.state_dict().items()}
    assert torch.equal(compute_features(net, x, batch_size=3)[0], feats)
    assert net.training and net.conv[1].training and not net.classifier[1].training  # each module's mode restored
    assert all(torch.equal(v, running[k]) for k, v in net.state_dict().items())


@needs_assets
def test_shipped_feature_net_classifies_test_images():
    net = load_feature_net()
    assert not net.training
    data = np.load(DATA)
    x = to_model_range(torch.from_numpy(data["images"]))
    feats, logits = compute_features(net, x)
    acc = (logits.argmax(1) == torch.from_numpy(data["labels"]).long()).float().mean().item()
    assert acc >= 0.85, acc
    assert feats.shape == (256, net.config["feature_dim"]) and (feats < 0).any()  # pre-ReLU features
    torch.testing.assert_close(net.logits(x[:8]), logits[:8], atol=1e-5, rtol=1e-5)


@needs_assets
def test_shipped_reference_stats():
    net = load_feature_net()
    d = net.config["feature_dim"]
    for split in ("test", "train"):
        mu, sigma = load_reference_stats(split)
        assert mu.shape == (d,) and sigma.shape == (d, d) and mu.dtype == np.float64
        np.testing.assert_allclose(sigma, sigma.T)
    with pytest.raises(ValueError, match="no reference statistics for split 'val'.*'test', 'train'"):
        load_reference_stats("val")


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json not found"):
        load_feature_net(tmp_path)
    with pytest.raises(FileNotFoundError, match="reference_stats.safetensors not found"):
        load_reference_stats(path=tmp_path)


def test_compute_features_refuses_inputs_it_would_silently_misread():
    net = FeatureNet(feature_dim=16)
    with pytest.raises(TypeError, match="float images in \\[-1, 1\\], got torch.uint8: .*msfp.data.to_model_range"):
        compute_features(net, torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    for shape in ((2, 1, 36, 36), (2, 1, 28, 28), (2, 32, 32), (2, 3, 32, 32)):
        with pytest.raises(ValueError, match=rf"shape \(N, 1, 32, 32\), got \({shape[0]}, {shape[1]}"):
            compute_features(net, torch.zeros(shape))
    with pytest.raises(ValueError, match="no images"):  # NaN features otherwise
        compute_features(net, torch.zeros(0, 1, 32, 32))
    assert compute_features(net, torch.zeros(2, 1, 32, 32, dtype=torch.float16))[0].shape == (2, 16)
