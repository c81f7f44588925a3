"""The detector network (PyTorch; training and export only, never imported by the runtime).

A compact CNN, trained from scratch, on the aligned cell crop:

* a backbone of four strided stages (16-32-64-128 channels);
* class logits from the concatenated average and max pool of the last stage (the max
  keeps small defects such as dents from being averaged away) and the heat map's peak;
* a coarse defect heat map from the 1/8-resolution stage;
* the swelling estimate in mm (the "virtual thickness gauge").

A top-view crop mirrored across its long axis is another valid cell, and training shows the
network both (`pouchline.models.dataprep.mirrors`). At inference the crop and its mirror image
are scored together and their probabilities averaged (`Detector.infer`): the two scores of one
cell often disagree, and their average leaves fewer good cells scoring high (they set the
threshold) and fewer defects scoring low. On the banded test set the top model shipped before
this caught 78 % of top-view deformations at 0.25 % false rejects alone, 88 % as a pair. It costs
twice the network's compute per crop: the whole inspection path's ceiling on this 2-core machine
fell from 254 to 211 frames/s (`pouchline bench pipeline`, 2026-12-01).

`Deployed` wraps it for ONNX: it takes uint8 NHWC crops, bakes in the normalisation and
the swelling calibration (a linear correction fitted on validation), and adds the anomaly
score. That score is the Mahalanobis distance of the pooled embedding
from the Gaussian of good cells, computed in the graph through the Cholesky factor of the
precision matrix.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class Detector(nn.Module):
    """Backbone plus class, heat-map and swelling heads."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128),
                 num_kinds: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.stage2 = _stage(widths[0], widths[1])
        self.stage3 = _stage(widths[1], widths[2])
        self.stage4 = _stage(widths[2], widths[3])
        self.heat = nn.Conv2d(widths[2], 1, 1)
        self.embedding_size = 2 * widths[3]
        self.classes = nn.Linear(self.embedding_size + 1, num_classes)
        self.swelling = nn.Sequential(nn.Linear(self.embedding_size, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
        # Training-only head: which deformation kinds are present. Naming the kind teaches
        # features for each one; the deployed graph does not use it.
        self.kinds = nn.Linear(self.embedding_size + 1, num_kinds)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised NCHW input -> (class logits, heat logits N x h x w, swelling mm, embedding)."""
        return self.forward_all(x)[:4]

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`forward` plus the training-only deformation-kind logits."""
        mid = self.stage3(self.stage2(self.stem(x)))
        deep = self.stage4(mid)
        heat = self.heat(mid)[:, 0]
        embedding = torch.cat([deep.mean(dim=(2, 3)), deep.amax(dim=(2, 3))], dim=1)
        hottest = heat.amax(dim=(1, 2))[:, None]  # a local defect anywhere is evidence by itself
        features = torch.cat([embedding, hottest], dim=1)
        return self.classes(features), heat, self.swelling(embedding)[:, 0], embedding, self.kinds(features)

    def infer(self, x: torch.Tensor, multilabel: bool, mirror: bool) -> tuple[torch.Tensor, ...]:
        """Input -> (class probabilities, heat-map probabilities, swelling, embedding), as deployed:
        with ``mirror``, scored together with its mirror image (rows reversed; see `score`)."""
        return self.score(torch.cat([x, x.flip(2)]) if mirror else x, multilabel, mirror)

    def score(self, batch: torch.Tensor, multilabel: bool, paired: bool) -> tuple[torch.Tensor, ...]:
        """`infer` on a batch built already: ``paired``, its second half is its first half's
        mirror image, and each crop gets the pair's average probabilities, heat map (turned
        back) and swelling. The embedding stays the crop's own, so the anomaly score's Gaussian
        (fitted on it) holds. The halves are split by reshapes, not by the batch's size: the
        graph then reads no shapes at run time."""
        logits, heat, swelling, embedding = self(batch)
        probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
        heat = torch.sigmoid(heat)
        if not paired:
            return probs, heat, swelling, embedding
        heat = heat.reshape(2, -1, heat.shape[1], heat.shape[2])
        return (probs.reshape(2, -1, probs.shape[1]).mean(dim=0), (heat[0] + heat[1].flip(1)) / 2,
                swelling.reshape(2, -1).mean(dim=0), embedding.reshape(2, -1, embedding.shape[1])[0])


class _FoldedStem(nn.Module):
    """The stem convolution with its batch norm *and the input normalisation* folded in.

    Raw pixel values go in and the stem's output comes out unchanged: padding with the mean
    reproduces the zero padding of the normalised input exactly. Without this the graph
    starts with an element-wise subtract and multiply over the whole image, which onnxruntime
    runs slowly next to quantised convolutions.
    """

    def __init__(self, stem: nn.Sequential, mean: float, scale: float) -> None:
        super().__init__()
        conv, norm = stem[0], stem[1]
        gain = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = conv.weight * gain[:, None, None, None] * scale
        bias = norm.bias - norm.running_mean * gain - mean * weight.sum(dim=(1, 2, 3))
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.mean, self.stride, self.padding = float(mean), conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = nn.functional.pad(x, (self.padding[1],) * 2 + (self.padding[0],) * 2, value=self.mean)
        return torch.relu(nn.functional.conv2d(padded, self.weight, self.bias, stride=self.stride))


class Deployed(nn.Module):
    """What the ONNX file computes: uint8 NHWC crops in, probabilities and scores out."""

    def __init__(self, detector: Detector, mean: float, std: float, multilabel: bool, mirror: bool,
                 centre: torch.Tensor, whitening: torch.Tensor, swelling: tuple[float, float] = (1.0, 0.0)) -> None:
        super().__init__()
        self.detector = copy.deepcopy(detector).eval()
        self.detector.stem = _FoldedStem(detector.stem, mean, 1.0 / std)
        self.multilabel = multilabel
        self.mirror = mirror
        self.register_buffer("centre", centre.to(torch.float32))
        self.register_buffer("whitening", whitening.to(torch.float32))
        self.register_buffer("swelling_scale", torch.tensor(swelling[0], dtype=torch.float32))
        self.register_buffer("swelling_offset", torch.tensor(swelling[1], dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The mirror pair is made of the raw pixels, so the INT8 stem takes it as its input (see stemquant).
        pixels = torch.cat([image, image.flip(1)]) if self.mirror else image
        probs, heat, swelling, embedding = self.detector.score(pixels.permute(0, 3, 1, 2).to(torch.float32),
                                                               self.multilabel, self.mirror)
        white = (embedding - self.centre) @ self.whitening
        anomaly = torch.sqrt((white * white).sum(dim=1))
        swelling_mm = torch.relu(swelling * self.swelling_scale + self.swelling_offset)
        return probs, heat, swelling_mm, anomaly
