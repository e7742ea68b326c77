"""The shipped feature network: a small Fashion-MNIST classifier whose penultimate layer is msfp's offline feature space.

No Inception-v3 weights are available offline, so Fréchet distance (FD), KID and the classifier score of the default
model are measured in the feature space of this CNN (trained by ``scripts/train_feature_net.py``). Numbers in this
space are comparable with each other, not with published FID/IS values.

Inputs are in the diffusion model's range: float (N, 1, 32, 32) in [-1, 1] (see :func:`msfp.data.to_model_range`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

FEATURE_NET_DIR = Path(__file__).parent / "assets" / "feature_net"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATS_NAME = "reference_stats.safetensors"


class FeatureNet(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (32x32 → 4x4), a linear feature layer of ``feature_dim`` units, ReLU, a
    linear head. Features are taken before that ReLU: after it, units that are never active make covariances singular.
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128,
                 num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.config = dict(in_channels=in_channels, channels=list(channels), feature_dim=feature_dim,
                           num_classes=num_classes, image_size=image_size)
        layers, c_in = [], in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, feature_dim))
        self.classifier = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate pre-activations (N, feature_dim): the space FD and KID are computed in."""
        return self.fc(self.conv(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)


def feature_dim() -> int:
    """The dimension of the shipped feature network's features, read from its config (no weights loaded)."""
    return json.loads((FEATURE_NET_DIR / CONFIG_NAME).read_text())["feature_dim"]


def load_feature_net(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FeatureNet:
    """Load the feature network (default: the shipped one) in eval mode."""
    path = Path(path) if path is not None else FEATURE_NET_DIR
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"feature network file {f} not found; expected {CONFIG_NAME} and {WEIGHTS_NAME} "
                                    "as written by scripts/train_feature_net.py")
    config = json.loads(config_file.read_text())
    net = FeatureNet(**{k: config[k] for k in ("in_channels", "channels", "feature_dim", "num_classes", "image_size")})
    net.load_state_dict(load_file(weights_file))
    return net.eval().to(device)


def load_reference_stats(split: str = "test", path: str | os.PathLike | None = None):
    """``(mu, sigma)`` float64 numpy arrays of the feature net's features over 10,000 ``split`` images.

    ``"test"``: the whole Fashion-MNIST test split (the reference for FD). ``"train"``: 10,000 training images; the FD
    between them and ``"test"`` is the floor a perfect generator would reach with 10,000 samples.
    """
    path = Path(path) if path is not None else FEATURE_NET_DIR
    stats_file = path / STATS_NAME
    if not stats_file.is_file():
        raise FileNotFoundError(f"reference statistics {stats_file} not found (written by scripts/train_feature_net.py)")
    stats = load_file(stats_file)
    if f"mu_{split}" not in stats:
        names = sorted(k[3:] for k in stats if k.startswith("mu_"))
        raise ValueError(f"no reference statistics for split {split!r} in {stats_file}; available: {names}")
    return stats[f"mu_{split}"].numpy(), stats[f"sigma_{split}"].numpy()


@torch.no_grad()
def compute_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 500):
    """``(features, logits)`` for float images in [-1, 1], computed in batches, in eval mode whatever mode ``net`` is
    in: in training mode batch norm would use (and update) each batch's statistics, and dropout drop units."""
    # Checked because a wrong input still gives features: uint8 ones ~90x too large, other sizes a different pooling.
    if not images.is_floating_point():
        raise TypeError(f"compute_features takes float images in [-1, 1], got {images.dtype}: convert uint8 images "
                        "with msfp.data.to_model_range (N, 28, 28) or msfp.samples.from_uint8 (N, H, W, C)")
    shape = (net.config["in_channels"], net.config["image_size"], net.config["image_size"])
    if images.dim() != 4 or images.shape[1:] != shape:
        raise ValueError(f"compute_features takes images of shape (N, {', '.join(map(str, shape))}), got "
                         f"{tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("compute_features got no images (N = 0)")
    feats, logits = [], []
    device = next(net.parameters()).device
    modes = {module: module.training for module in net.modules()}  # each submodule's, as the caller set them
    net.eval()
    try:
        for batch in images.split(batch_size):
            f = net.features(batch.to(device, torch.float32))
            feats.append(f.cpu())
            logits.append(net.classifier(f).cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    return torch.cat(feats), torch.cat(logits)
