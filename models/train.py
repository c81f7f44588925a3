"""`pouchline model train`: train the detector from scratch, deterministically per seed.

A run folder holds everything about a run:

* ``config.json``: settings, classes and normalisation;
* ``checkpoint.pt``: the state after the last finished epoch, for ``--resume``;
* ``train_log.jsonl``: one line per epoch;
* ``detector.pt``: the final weights;
* ``calibration.json``: the good-cell Gaussian for the anomaly score and the thresholds at
  the target false-reject rate;
* ``metrics.json``: validation metrics.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from pouchline.datasets.manifest import DatasetError, DatasetReader
from pouchline.models.dataprep import Prepared, manifest_hash, mirrors, prepare
from pouchline.models.metrics import auroc, recall, threshold_at_frr
from pouchline.models.network import Detector


class TrainConfig(BaseModel):
    """Settings of a training run (stored in the run folder; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(12, ge=1, description="Passes over the training split.")
    seed: int = Field(0, description="Seed of initialisation, batch order and augmentation.")
    batch_size: int = Field(64, ge=2, description="Crops per optimiser step.")
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate (one-cycle schedule).")
    channels: int = Field(1, description="1 = grayscale input, 3 = BGR.")
    view: Literal["top", "side"] = Field("top", description="Which camera's frames to train on (imported aligned "
                                        "crops: ignored).")
    target_frr: float = Field(0.005, gt=0, lt=1, description="False-reject rate on good cells the thresholds are set at.")
    heat_weight: float = Field(2.0, ge=0, description="Weight of the heat-map loss.")
    swelling_weight: float = Field(1.0, ge=0, description="Weight of the swelling (mm) loss.")
    workers: int = Field(2, ge=1, description="Processes that decode and align frames once, before training.")
    threads: int = Field(2, ge=1, description="PyTorch compute threads.")


def task_of(classes: list[str]) -> tuple[list[str], bool]:
    """Model outputs and whether they are independent (multi-label).

    With an 'ok' class every other class is a defect a cell may have several of (sigmoid
    per defect, 'ok' = none); without one the classes exclude each other (softmax).
    """
    if "ok" in classes:
        outputs = [c for c in classes if c != "ok"]
        if not outputs:
            raise ValueError("a dataset whose only class is 'ok' has nothing to detect")
        return outputs, True
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to train a classifier, got {classes}")
    return list(classes), False


def _targets(prepared: Prepared, classes: list[str], outputs: list[str], view: str = "top") -> np.ndarray:
    """Per-output targets; NaN where the frame cannot show its label (left out of the loss).

    A side view sees only what changes the silhouette: a dent or a crease leaves it as it
    was, and the frame's defect mask is empty. Teaching the side model that such a frame is
    'deformed' would only teach it to hedge on every cell; the top view judges those.
    """
    index = [classes.index(name) for name in outputs]
    targets = prepared.labels[:, index].copy()
    if view == "side" and "deformed" in outputs:
        column = outputs.index("deformed")
        unseen = np.isfinite(prepared.heat).all(axis=(1, 2)) & (np.nan_to_num(prepared.heat).max(axis=(1, 2)) == 0)
        targets[unseen & (targets[:, column] > 0.5), column] = np.nan
    return targets


def _blur(batch: torch.Tensor, generator: torch.Generator, max_sigma: float) -> torch.Tensor:
    """Each crop blurred by its own Gaussian (sigma up to ``max_sigma`` crop pixels across the
    cell's length, half that along it): a lens out of focus or a cell moving past the camera."""
    n, height, width, channels = batch.shape
    sigma = torch.empty(n).uniform_(0.0, max_sigma, generator=generator)
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    planes = batch.permute(3, 0, 1, 2).reshape(1, channels * n, height, width)
    for axis, scale in ((2, 1.0), (3, 0.5)):
        kernel = torch.exp(-0.5 * (offsets[None, :] / (sigma[:, None] * scale).clamp_min(1e-3)) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat(channels, 1)
        shape = (channels * n, 1, 7, 1) if axis == 2 else (channels * n, 1, 1, 7)
        padding = (0, 0, 3, 3) if axis == 2 else (3, 3, 0, 0)
        planes = nn.functional.conv2d(nn.functional.pad(planes, padding, mode="replicate"), kernel.reshape(shape),
                                      groups=channels * n)
    return planes.reshape(channels, n, height, width).permute(1, 2, 3, 0)


def _augment(batch: torch.Tensor, heat: torch.Tensor, generator: torch.Generator,
             view: str = "top") -> tuple[torch.Tensor, torch.Tensor]:
    """Photometric jitter, sensor noise, small shifts and vertical flips (N, H, W, C floats 0..255).

    A top-view crop mirrored across its long axis is another valid cell; a side-view crop is
    not (the belt is always below). A side-view crop is blurred instead: its silhouette's edge
    is where thickness is read, and how sharp that edge is depends on the camera."""
    n = batch.shape[0]
    mirror = mirrors(view)
    gain = torch.empty(n, 1, 1, 1).uniform_(0.75, 1.25, generator=generator)
    offset = torch.empty(n, 1, 1, 1).uniform_(-12.0, 12.0, generator=generator)
    noise = torch.randn(batch.shape, generator=generator) * torch.empty(n, 1, 1, 1).uniform_(0.0, 5.0, generator=generator)
    batch = batch * gain + offset + noise
    flip = (torch.rand(n, generator=generator) < 0.5) & mirror
    batch[flip] = batch[flip].flip(1)
    heat = heat.clone()
    heat[flip] = heat[flip].flip(1)
    shift = int(torch.randint(-3, 4, (1,), generator=generator))
    if view == "side":
        batch = _blur(batch, generator, 1.2)
    return batch.roll(shift, dims=2), heat


class Trainer:
    """Holds a run's data, model and optimiser; `fit` runs the remaining epochs."""

    def __init__(self, data: Path, run: Path, config: TrainConfig, *, resume: bool, progress: bool = True) -> None:
        self.data, self.run, self.config, self.progress = data, run, config, progress
        reader = DatasetReader(data)
        self.info = reader.info
        self.outputs, self.multilabel = task_of(self.info.classes)
        torch.set_num_threads(config.threads)
        torch.use_deterministic_algorithms(True)
        cache = run / "cache"
        common = dict(channels=config.channels, classes=self.info.classes, view=config.view, cache_dir=cache,
                      workers=config.workers, progress=progress)
        self.train_set = prepare(data, "train", **common)
        self.val_set = prepare(data, "val", **common)
        self.mean = float(self.train_set.crops.mean())
        self.std = float(self.train_set.crops.std()) or 1.0
        self.has_swelling = bool(np.isfinite(self.train_set.swelling).any())
        torch.manual_seed(config.seed)
        # Channels-last runs CPU convolutions about a fifth faster in training (oneDNN's own layout).
        self.model = Detector(config.channels, len(self.outputs)).to(memory_format=torch.channels_last)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
        steps = config.epochs * math.ceil(len(self.train_set) / config.batch_size)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.optimiser, config.learning_rate, total_steps=steps)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        checkpoint = run / "checkpoint.pt"
        if resume:
            if not checkpoint.exists():
                raise FileNotFoundError(f"{checkpoint}: nothing to resume (no checkpoint)")
            self._load(checkpoint)
        elif checkpoint.exists():
            raise FileExistsError(f"{run} already holds a training run; pass --resume or choose another --out")
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(self.describe(), indent=2))

    def describe(self) -> dict[str, Any]:
        """What export and evaluation need to know about the run."""
        return {
            "config": self.config.model_dump(),
            "data": str(self.data),
            "data_sha256": manifest_hash(self.data),
            "dataset": self.info.model_dump(),
            "classes": self.info.classes,
            "outputs": self.outputs,
            "multilabel": self.multilabel,
            "has_swelling": self.has_swelling,
            "mean": self.mean,
            "std": self.std,
        }

    def _load(self, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        if state["config"] != self.config.model_dump():
            raise ValueError(f"{path}: --resume needs the settings the run started with: {state['config']}")
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])

    def _save(self) -> None:
        state = {
            "config": self.config.model_dump(), "model": self.model.state_dict(), "optimiser": self.optimiser.state_dict(),
            "schedule": self.schedule.state_dict(), "epoch": self.epoch, "history": json.dumps(self.history),
        }
        temp = self.run / "checkpoint.pt.tmp"
        torch.save(state, temp)
        temp.replace(self.run / "checkpoint.pt")

    def _normalise(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """NHWC pixels (uint8 or augmented floats) -> the network's normalised channels-last input."""
        batch = torch.as_tensor(crops, dtype=torch.float32)
        return ((batch - self.mean) / self.std).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def _loss(self, outputs: tuple[torch.Tensor, ...], targets: torch.Tensor, heat: torch.Tensor,
              swelling: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        logits, heat_logits, swelling_mm, _, kind_logits = outputs
        if self.multilabel:
            known_targets = torch.isfinite(targets)
            loss = nn.functional.binary_cross_entropy_with_logits(logits[known_targets], targets[known_targets])
        else:
            loss = nn.functional.cross_entropy(logits, targets.argmax(dim=1))
        known_heat = torch.isfinite(heat)
        if known_heat.any() and self.config.heat_weight > 0:
            loss = loss + self.config.heat_weight * nn.functional.binary_cross_entropy_with_logits(
                heat_logits[known_heat], heat[known_heat]
            )
        known_kinds = torch.isfinite(kinds)
        if known_kinds.any():
            loss = loss + 0.5 * nn.functional.binary_cross_entropy_with_logits(kind_logits[known_kinds], kinds[known_kinds])
        known = torch.isfinite(swelling)
        if known.any() and self.config.swelling_weight > 0:
            loss = loss + self.config.swelling_weight * nn.functional.smooth_l1_loss(
                swelling_mm[known], swelling[known], beta=0.1
            )
        return loss

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs (checkpoint after each), then calibrate and save."""
        targets = _targets(self.train_set, self.info.classes, self.outputs, self.config.view)
        n, size = len(self.train_set), self.config.batch_size
        with Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), disable=not self.progress) as bar:
            while self.epoch < self.config.epochs:
                started = time.perf_counter()
                order = np.random.default_rng([self.config.seed, self.epoch]).permutation(n)
                generator = torch.Generator().manual_seed(self.config.seed * 1000 + self.epoch)
                task = bar.add_task("train", total=n // size, epoch=self.epoch + 1, loss=0.0)
                self.model.train()
                total = 0.0
                for step in range(n // size):
                    rows = order[step * size : (step + 1) * size]
                    crops, heat = _augment(torch.as_tensor(self.train_set.crops[rows], dtype=torch.float32),
                                           torch.as_tensor(self.train_set.heat[rows]), generator, self.config.view)
                    loss = self._loss(self.model.forward_all(self._normalise(crops)), torch.as_tensor(targets[rows]), heat,
                                      torch.as_tensor(self.train_set.swelling[rows]),
                                      torch.as_tensor(self.train_set.deformations[rows]))
                    self.optimiser.zero_grad()
                    loss.backward()
                    self.optimiser.step()
                    self.schedule.step()
                    total += float(loss.detach())
                    bar.update(task, advance=1, loss=total / (step + 1))
                bar.remove_task(task)
                self.epoch += 1
                entry = {"epoch": self.epoch, "loss": total / max(n // size, 1), "seconds": time.perf_counter() - started,
                         **self.validate()}
                self.history.append(entry)
                with open(self.run / "train_log.jsonl", "a") as log:
                    log.write(json.dumps(entry) + "\n")
                self._save()
        return self.finish()

    @torch.no_grad()
    def predict(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """Probabilities, swelling and embeddings of a prepared set, as the exported graph computes them."""
        self.model.eval()
        probs, swelling, embeddings = [], [], []
        mirror = mirrors(self.config.view)
        for start in range(0, len(prepared), 256):
            prob, _, mm, embedding = self.model.infer(self._normalise(prepared.crops[start : start + 256]),
                                                      self.multilabel, mirror)
            probs.append(prob)
            swelling.append(torch.relu(mm))
            embeddings.append(embedding)
        return {"probs": torch.cat(probs).numpy(), "swelling": torch.cat(swelling).numpy(),
                "embedding": torch.cat(embeddings).numpy()}

    def validate(self) -> dict[str, float]:
        """Per-output AUROC and swelling error on the validation split."""
        predicted = self.predict(self.val_set)
        targets = _targets(self.val_set, self.info.classes, self.outputs, self.config.view)
        known = np.isfinite(targets)
        result = {f"val_{name}_auroc": auroc(predicted["probs"][known[:, k], k], targets[known[:, k], k] > 0.5)
                  for k, name in enumerate(self.outputs)}
        known_swelling = np.isfinite(self.val_set.swelling)
        if self.has_swelling and known_swelling.any():
            result["val_swelling_mae_mm"] = float(np.abs(predicted["swelling"][known_swelling]
                                                         - self.val_set.swelling[known_swelling]).mean())
        return result

    def finish(self) -> dict[str, Any]:
        """Fit the good-cell Gaussian, set thresholds on validation good cells, save everything."""
        good_train = self._good(self.train_set)
        embeddings = self.predict(self.train_set)["embedding"][good_train]
        centre = embeddings.mean(axis=0)
        covariance = np.cov(embeddings, rowvar=False)
        covariance += np.eye(covariance.shape[0]) * (1e-3 * np.trace(covariance) / covariance.shape[0])
        whitening = np.linalg.cholesky(np.linalg.inv(covariance))  # precision = W W^T
        predicted = self.predict(self.val_set)
        white = (predicted["embedding"] - centre) @ whitening
        anomaly = np.sqrt((white * white).sum(axis=1))
        good_val = self._good(self.val_set)
        if good_val.sum() < 10:
            raise DatasetError(self.data, f"validation split has only {int(good_val.sum())} good frames; thresholds need more")
        calibration = {
            "centre": centre.tolist(), "whitening": whitening.tolist(), "thresholds": self._thresholds(predicted, good_val),
            "anomaly_threshold": threshold_at_frr(anomaly[good_val], self._share()),
            "target_frr": self.config.target_frr, "calibrated_on": int(good_val.sum()),
            "swelling": self._swelling_calibration(predicted["swelling"]),
        }
        (self.run / "calibration.json").write_text(json.dumps(calibration))
        torch.save(self.model.state_dict(), self.run / "detector.pt")
        metrics = {"epochs": self.epoch, **(self.history[-1] if self.history else {}),
                   **self._decisions(predicted, calibration["thresholds"])}
        (self.run / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

    def _good(self, prepared: Prepared) -> np.ndarray:
        """Frames the false-reject rate is counted on: 'ok' ones (all frames without an 'ok' class)."""
        if self.multilabel:
            return prepared.labels[:, self.info.classes.index("ok")] > 0.5
        return np.ones(len(prepared), bool)

    def _share(self) -> float:
        """False-reject budget of each flag. The line rejects a cell that any defect output or
        the anomaly score flags, so they split the target between them and their union stays
        within it. (Multi-class models decide by the top class; only the anomaly score is a flag.)"""
        return self.config.target_frr / (len(self.outputs) + 1) if self.multilabel else self.config.target_frr

    def _thresholds(self, predicted: dict[str, np.ndarray], good: np.ndarray) -> dict[str, float]:
        """Per-defect thresholds at their share of the false-reject budget (none for multi-class)."""
        if not self.multilabel:
            return {}
        return {name: threshold_at_frr(predicted["probs"][good, k], self._share()) for k, name in enumerate(self.outputs)}

    def _swelling_calibration(self, predicted: np.ndarray) -> dict[str, float]:
        """Linear correction (scale, offset) of the swelling estimate, fitted on validation."""
        known = np.isfinite(self.val_set.swelling)
        # A fit needs estimates that vary: a barely trained head (a quick check) can output
        # 0 for every frame, and the fit would then fail instead of leaving the gauge as it is.
        if not self.has_swelling or known.sum() < 10 or np.ptp(predicted[known]) < 1e-6:
            return {"scale": 1.0, "offset": 0.0}
        scale, offset = np.polyfit(predicted[known], self.val_set.swelling[known], 1)
        return {"scale": float(scale), "offset": float(offset)}

    def _decisions(self, predicted: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict[str, float]:
        """Validation recall per output at the thresholds (multi-class: accuracy and per-class recall)."""
        targets = _targets(self.val_set, self.info.classes, self.outputs, self.config.view)
        if not self.multilabel:
            truth, guess = targets.argmax(axis=1), predicted["probs"].argmax(axis=1)
            result = {"val_accuracy": float((truth == guess).mean())}
            for k, name in enumerate(self.outputs):
                result[f"val_{name}_recall"] = float((guess[truth == k] == k).mean()) if (truth == k).any() else float("nan")
            return result
        flags = np.stack([predicted["probs"][:, k] > thresholds[name] for k, name in enumerate(self.outputs)], axis=1)
        result = {f"val_{name}_recall": recall(predicted["probs"][targets[:, k] > 0.5, k], thresholds[name])
                  for k, name in enumerate(self.outputs)}
        result["val_false_reject_rate"] = float(flags[self._good(self.val_set)].any(axis=1).mean())
        return result


def train(data: Path, run: Path, config: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run; returns its validation metrics."""
    return Trainer(data, run, config, resume=resume, progress=progress).fit()
