import importlib.util

import numpy as np
import pytest
import torch

# find_spec, not importorskip: msfp.inception also works where torch_fidelity's own __init__ fails (no torchvision).
if importlib.util.find_spec("torch_fidelity") is None:
    pytest.skip("Inception metrics need the optional extra: pip install 'msfp[inception]'", allow_module_level=True)

import msfp.evaluation as evaluation  # noqa: E402
from msfp.evaluation import Reference, evaluate  # noqa: E402
from msfp.inception import InceptionFeatures, _extractor_class, inception_features  # noqa: E402
from msfp.samples import save_samples  # noqa: E402


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 architecture with random weights: tests the plumbing, never downloads."""
    cls = _extractor_class()
    module = __import__(cls.__module__, fromlist=["_"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(cls, "load_state_dict", lambda self, state_dict: None)
        torch.manual_seed(0)
        net = cls("random", ["2048"], feature_extractor_weights_path=None)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def net(random_weights):
    return InceptionFeatures(random_weights)


def test_feature_shapes_and_grayscale(net):
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    f = net(images)
    assert f["pool"].shape == (3, 2048) and f["spatial"].shape == (3, 7 * 17 * 17) and f["logits"].shape == (3, 1008)
    assert all(torch.isfinite(v).all() for v in f.values())
    torch.testing.assert_close(net(images.expand(-1, 3, -1, -1))["pool"], f["pool"])  # gray = RGB with equal planes
    batched = inception_features(net, images.permute(0, 2, 3, 1).numpy(), batch_size=2)
    np.testing.assert_allclose(batched["pool"], f["pool"].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="expected uint8 images"):
        net(images.float())


def test_bad_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        InceptionFeatures(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torch-fidelity Inception-v3 weights"):
        InceptionFeatures(tmp_path / "other.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")  # not a dict: a TypeError in torch-fidelity, a traceback
    with pytest.raises(ValueError, match="tensor.pth: not torch-fidelity Inception-v3 weights"):
        InceptionFeatures(tmp_path / "tensor.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not torch-fidelity Inception-v3 weights"):
        InceptionFeatures(tmp_path / "junk.pth")


def test_evaluate_with_inception(tmp_path, random_weights, monkeypatch):
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "s.npz", rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8), np.arange(10))
    reference = Reference(name="ref", images=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    # scipy's sqrtm of a 2048x2048 matrix takes ~20 s on one core: record the Fréchet calls instead.
    calls = []
    monkeypatch.setattr(evaluation, "frechet_distance", lambda mu1, s1, mu2, s2: calls.append(len(mu1)) or 1.5)
    result = evaluate(tmp_path / "s.npz", reference, inception_weights=random_weights, device="cpu")
    m = result["metrics"]
    assert calls == [2048, 2023] and m["fid"] == m["sfid"] == 1.5  # pool_3 features, then the sFID features
    assert 1 <= m["inception_score"] < 1008 and 0 <= m["inception_precision"] <= 1 and 0 <= m["inception_recall"] <= 1
    assert "fd, kid, classifier_score, precision, recall" in result["skipped"]  # 16x16x3 is not Fashion-MNIST

    stats_only = Reference(name="stats", stats=(np.zeros(128), np.eye(128)), no_images_reason="stats only")
    result = evaluate(tmp_path / "s.npz", stats_only, inception_weights=random_weights, device="cpu")
    assert "inception_score" in result["metrics"] and "fid" not in result["metrics"]
    assert result["skipped"]["fid, sfid, inception_precision, inception_recall"] == (
        "they need reference images: stats only")
