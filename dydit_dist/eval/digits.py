"""The offline demo's data and feature extractor: scikit-learn's handwritten digits (1,797 8x8 images
of 10 classes, shipped with the package) and a small CNN classifier trained on them.

The classifier stands in for Inception-v3 where Inception's weights cannot be had (no network): its
64-wide penultimate layer gives the Frechet distance and precision/recall, its logits the "Inception"
score. Numbers computed with it are on ITS features and are labelled so ("FID [digits-cnn]"); they
are comparable with each other, never with published Inception FIDs.

    write_digits_imagefolder("outputs/demo/sources/digits")       # ImageFolder layout, 8-bit grey PNGs
    train_digits_classifier("outputs/demo/digits-cnn.safetensors")
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from dydit_dist import storage
from dydit_dist.models import load_state_dict_file
from dydit_dist.network import save_weights

from .metrics import EvalInputError

log = logging.getLogger(__name__)

NAME = "digits-cnn"
FEATURE_WIDTH = 64
INPUT_SIZE = 8


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 images (0..16 scaled to 0..255) and (1797,) int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits_imagefolder(url: str) -> int:
    """Write the digits as `{url}/{class}/{i:04d}.png` (skipped when a marker says it is done);
    returns the number of images."""
    images, labels = digits_images()
    done = storage.join(url, "_COMPLETE")
    if storage.exists(done):
        return len(images)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(image, "L").save(buf, format="PNG")
        storage.write_bytes(storage.join(url, str(label), f"{i:04d}.png"), buf.getvalue())
    storage.write_bytes(done, b"")
    return len(images)


class DigitsNet(nn.Module):
    """uint8 (B, 3, H, W) -> (B, 64) features, (B, 10) logits; images are greyed and resized to 8x8."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, FEATURE_WIDTH)
        self.fc2 = nn.Linear(FEATURE_WIDTH, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float().mean(dim=1, keepdim=True) / 255.0  # (B, 1, H, W) in [0, 1]
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
        features = F.relu(self.fc1(x.flatten(1)))  # (B, 64)
        return features, self.fc2(features)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor `digits-cnn`: features "64" (FID, PRC) and "logits" (IS)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise EvalInputError(f"{NAME}: weights are required (eval.feature_extractor_weights); train them with "
                                 "dydit_dist.eval.digits.train_digits_classifier")
        self.net = DigitsNet()  # safetensors or a tensors-only .pt, told apart by content
        self.net.load_state_dict(load_state_dict_file(feature_extractor_weights_path))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return (str(FEATURE_WIDTH), "logits", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": str(FEATURE_WIDTH), "kid": str(FEATURE_WIDTH), "prc": str(FEATURE_WIDTH)}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x):
        features, logits = self.net(x)
        out = {str(FEATURE_WIDTH): features, "logits": logits, "logits_unbiased": logits}
        return tuple(out[name] for name in self.features_list)


def train_digits_classifier(url: str, steps: int = 300, seed: int = 0) -> float:
    """Train `DigitsNet` on the digits (held-out fifth for accuracy) and write its weights to `url`
    as safetensors; returns the held-out accuracy. Shifts of one pixel augment the training images."""

    images, labels = digits_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    x = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1)  # (N, 3, 8, 8) uint8
    y = torch.from_numpy(labels)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # convolutions on 8x8 images: more threads only add contention
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        batch = torch.from_numpy(rng.choice(train, 128))
        shift = tuple(int(s) for s in rng.integers(-1, 2, size=2))
        xb = torch.roll(x[batch], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(net(xb)[1], y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[test])[1].argmax(1) == y[test]).float().mean().item()
    torch.set_num_threads(threads)
    save_weights(net, url, metadata={"name": NAME, "held_out_accuracy": f"{accuracy:.4f}"})
    log.info("%s: held-out accuracy %.3f, weights at %s", NAME, accuracy, url)
    return accuracy
