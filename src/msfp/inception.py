"""Inception-v3 features for the standard FID, sFID, IS and precision/recall, from a local weights file.

The network is torch-fidelity's TensorFlow-compatible port (``pip install torch-fidelity``; the weights file is its
``weights-inception-2015-12-05-6726825d.pth``). Nothing is downloaded: the path must be given. Features:

- ``pool``: the 2048-d ``pool_3`` features (FID, KID, precision/recall);
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1``) at 17x17, flattened
  in TensorFlow's (H, W, C) order: 2023-d, the sFID features of Nash et al. 2021 and the guided-diffusion evaluator;
- ``logits``: the 1008 logits without the final bias, as in the reference Inception-score code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path

import torch
from torch import nn

SPATIAL_CHANNELS = 7


def _extractor_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ImportError as e:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or e.name != "torchvision":
            raise ImportError("Inception metrics need torch-fidelity: pip install 'msfp[inception]' (or, where no "
                              "torchvision matches your torch, pip install --no-deps torch-fidelity)") from e
    # torch_fidelity/__init__ imports its CLIP and VGG extractors, which need torchvision; the Inception extractor
    # does not. Import it through a bare package module so that a torch without torchvision still works.
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


class InceptionFeatures(nn.Module):
    """``forward(uint8 (N, C, H, W), C = 1 or 3) -> dict(pool, spatial, logits)``, float32 on the CPU."""

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found; expected torch-fidelity's "
                                    "weights-inception-2015-12-05-6726825d.pth (msfp never downloads it)")
        extractor = _extractor_class()
        try:
            self.net = extractor("inception-v3-compat", ["2048", "logits_unbiased"],
                                 feature_extractor_weights_path=str(path))
        # Not a state dict (a bare tensor or list: TypeError, AttributeError), or another architecture.
        except (RuntimeError, pickle.UnpicklingError, EOFError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not torch-fidelity Inception-v3 weights ({type(e).__name__}: "
                             f"{str(e)[:300]})") from e
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, args, output):
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        device = next(self.net.parameters()).device
        pool, logits = self.net(images.expand(-1, 3, -1, -1).to(device))
        return dict(pool=pool.cpu(), spatial=self._spatial.cpu(), logits=logits.cpu())


def inception_features(net: InceptionFeatures, images_nhwc, batch_size: int = 100) -> dict:
    """Features of uint8 (N, H, W, C) images, computed in batches."""
    images = torch.as_tensor(images_nhwc).permute(0, 3, 1, 2)
    parts = [net(batch) for batch in images.split(batch_size)]
    return {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
