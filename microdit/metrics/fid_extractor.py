"""The FID feature network stored in `<models>/fid`, loaded as one module images -> features.

The one reader of that directory's format; `microdit models` writes it. Two kinds, named by
`config.json` `kind`: `torchvision_inception_v3` (weights in `model.safetensors`, the smoke
preset's random Inception) and `cleanfid_inception` (clean-fid's TorchScript Inception).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from microdit.errors import UserError
from microdit.io import read_json

CLEANFID_WEIGHTS = "inception-2015-12-05.pt"


class FidFeatures(nn.Module):
    """Images (uint8, or float in [0, 255], N x 3 x H x W) -> (N, feature_dim) float32 features.

    Resizes to the network's input size when needed (clean-fid hands over 299 px already) and
    applies the network's own input normalisation, so clean-fid can use it as a custom extractor.
    """

    def __init__(self, net: nn.Module, input_size: int, mean: float | list, std: float | list, feature_dim: int):
        super().__init__()
        self.net, self.input_size, self.feature_dim = net, input_size, feature_dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, torch.float32)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std).reshape(len(x), self.feature_dim).float()


def load_fid_extractor(path: str | os.PathLike, device: str | torch.device = "cpu") -> FidFeatures:
    """The FID feature extractor in `<models>/fid` (either kind), in eval mode on `device`."""
    path = Path(path)
    config = read_json(path / "config.json")
    kind = config.get("kind")
    if kind == "torchvision_inception_v3":
        from safetensors.torch import load_file
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        net.fc = nn.Identity()  # the 2048-d pooled features, as FID uses
        imagenet_mean, imagenet_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        extractor = FidFeatures(net, int(config.get("input_size", 299)), [255 * m for m in imagenet_mean],
                                [255 * s for s in imagenet_std], int(config["feature_dim"]))
    elif kind == "cleanfid_inception":
        import warnings

        with warnings.catch_warnings():  # clean-fid ships TorchScript; there is no other format to load
            warnings.simplefilter("ignore", FutureWarning)
            base = torch.jit.load(str(path / config.get("weights", CLEANFID_WEIGHTS)), map_location="cpu")
        # clean-fid's "clean" mode: pixel values (x - 128) / 128 into the scripted Inception layers
        extractor = FidFeatures(base.layers, 299, 128.0, 128.0, 2048)
    else:
        raise UserError(f"{path}/config.json: unknown FID extractor kind {kind!r}")
    return extractor.eval().requires_grad_(False).to(device)
