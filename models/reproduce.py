"""`pouchline model reproduce`: rebuild the shipped detector from nothing, with one command.

The steps:

1. Render the training data (default domain, one deformation kind held out entirely).
2. Render a test set (new seeds, every kind) and a held-out-domain set.
3. Train, then export FP32 and INT8; INT8 is calibrated on training frames.
4. Evaluate both files on both sets.
5. Write the model card with the measured numbers.

Every seed is fixed, so the same machine gives the same model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from pouchline.datasets.domain import load_domain
from pouchline.datasets.records import DEFORMATION_KINDS
from pouchline.datasets.synth import SynthConfig, default_workers, synthesize

#: The deformation kind the shipped model never sees in training (anomaly-score test).
HELD_OUT_KIND = "bent_corner"
MODEL_NAME = "pouchline-detector"
TRAIN_KINDS = tuple(k for k in DEFORMATION_KINDS if k != HELD_OUT_KIND)
SETS: dict[str, dict[str, Any]] = {
    "train": {"count": 20000, "seed": 200, "domain": "default", "kinds": TRAIN_KINDS},
    "test": {"count": 4000, "seed": 300, "domain": "default", "kinds": DEFORMATION_KINDS},
    "heldout": {"count": 4000, "seed": 400, "domain": "heldout", "kinds": DEFORMATION_KINDS},
}
DEFECT_RATE = 0.5


def _synth(work: Path, name: str, scale: float) -> Path:
    settings = SETS[name]
    out = work / "data" / name
    config = SynthConfig(count=max(int(settings["count"] * scale), 50), seed=settings["seed"], defect_rate=DEFECT_RATE,
                         domain=load_domain(settings["domain"]), kinds=settings["kinds"])
    synthesize(out, config, workers=default_workers(), resume=out.exists())
    return out


def reproduce(out_dir: Path, work: Path, *, epochs: int = 30, seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Run every step; ``scale`` shrinks the datasets (for a quick check of the pipeline)."""
    from pouchline.models.bench import save_weights
    from pouchline.models.evaluate import evaluate
    from pouchline.models.export import export
    from pouchline.models.train import TrainConfig, train

    console = Console()
    started = time.perf_counter()
    data = {name: _synth(work, name, scale) for name in SETS}
    run = work / "run"
    if run.exists() and not (run / "checkpoint.pt").exists():
        shutil.rmtree(run)
    train(data["train"], run, TrainConfig(epochs=epochs, seed=seed), resume=(run / "checkpoint.pt").exists())
    # From the training log, so a resumed run still reports the time its epochs took.
    log_lines = (run / "train_log.jsonl").read_text().splitlines()
    train_minutes = sum(json.loads(line)["seconds"] for line in log_lines if line.strip()) / 60
    model = out_dir / f"{MODEL_NAME}.onnx"
    exported = export(run, model, int8=True, calib=data["train"])
    save_weights(run, out_dir / f"{MODEL_NAME}.pt")
    results: dict[str, Any] = {"train_minutes": train_minutes, "export": exported}
    for precision, path in (("fp32", model), ("int8", Path(exported["int8"]))):
        for name in ("test", "heldout"):
            console.print(f"evaluating {precision} on {name}")
            results[f"{precision}_{name}"] = evaluate(path, data[name], work / "eval" / f"{precision}-{name}")
    results["total_minutes"] = (time.perf_counter() - started) / 60
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    (out_dir / "MODEL_CARD.md").write_text(model_card(results, epochs=epochs, seed=seed, scale=scale))
    return results


def _row(label: str, target: str, fp32: float, int8: float, fmt: str = "{:.4f}") -> str:
    return f"| {label} | {target} | {fmt.format(fp32)} | {fmt.format(int8)} |"


def model_card(results: dict[str, Any], *, epochs: int, seed: int, scale: float) -> str:
    """The model card: what the model is, how it was made, what it measured, where it fails."""
    test, held = results["fp32_test"], results["fp32_heldout"]
    test8, held8 = results["int8_test"], results["int8_heldout"]
    drop = {p: max(r["swollen"]["recall"] - h["swollen"]["recall"], r["deformed"]["recall"] - h["deformed"]["recall"])
            for p, r, h in (("fp32", test, held), ("int8", test8, held8))}
    rows = [
        _row("swollen recall (>= 0.5 mm)", ">= 0.995", test["swollen"]["recall"], test8["swollen"]["recall"]),
        _row("deformed recall (trained kinds)", ">= 0.99", test["deformed"]["recall"], test8["deformed"]["recall"]),
        _row("false-reject rate, good cells (any flag)", "<= 0.005", test["false_reject_rate"], test8["false_reject_rate"]),
        _row("swollen AUROC", "", test["swollen"]["auroc"], test8["swollen"]["auroc"]),
        _row("deformed AUROC", "", test["deformed"]["auroc"], test8["deformed"]["auroc"]),
        _row("swelling MAE (mm, 0-3 mm)", "<= 0.15", test["swelling_mae_mm"], test8["swelling_mae_mm"]),
        _row(f"unseen kind ({HELD_OUT_KIND}) flagged by anomaly", ">= 0.90", test["anomaly"]["recall_unseen"],
             test8["anomaly"]["recall_unseen"]),
        _row("held-out domain: largest recall drop", "<= 0.01", drop["fp32"], drop["int8"]),
        _row("held-out domain: swollen recall", "", held["swollen"]["recall"], held8["swollen"]["recall"]),
        _row("held-out domain: deformed recall", "", held["deformed"]["recall"], held8["deformed"]["recall"]),
    ]
    kinds = "\n".join(f"| {kind} | {row['cells']} | {row['deformed_recall']:.3f} | {row['anomaly_recall']:.3f} | "
                      f"{row['rejected']:.3f} |" for kind, row in results["int8_test"].get("per_kind", {}).items())
    loss = results["export"].get("auroc_loss", {})
    sets = "\n".join(f"| {name} | {s['count'] * scale:.0f} cells | seed {s['seed']} | {s['domain']} | "
                     f"{', '.join(s['kinds'])} |" for name, s in SETS.items())
    return f"""# Model card: {MODEL_NAME}

A compact CNN (about 0.3 M parameters), trained from scratch, that inspects the aligned
top-view crop of one pouch cell. It outputs:

- the probability of `swollen` and of `deformed`;
- a coarse defect heat map;
- the swelling in mm (a virtual thickness gauge);
- an anomaly score: the Mahalanobis distance from good cells in embedding space, computed
  inside the ONNX graph.

Files:

- `{MODEL_NAME}.onnx`: FP32.
- `{MODEL_NAME}.int8.onnx`: static INT8, QDQ, per-channel; the uint8 pixels go straight into the
  quantised stem convolution (see `pouchline.models.stemquant`).
- A metadata JSON next to each file: input size, normalisation, classes, thresholds,
  swelling calibration, training-data hash, metrics, SHA-256.
- `{MODEL_NAME}.pt`: the same weights for PyTorch, used by `pouchline bench model`.

## Reproduce

```
pouchline model reproduce --out models/ --work runs/reproduce
```

{epochs} epochs, seed {seed}. The epochs took {results['train_minutes']:.1f} min in all (training log), on the
project's 2-core CPU machine; rendering the data, export and evaluation add about 7 min.

## Training data (synthetic, `pouchline dataset synth`)

| set | size | seeds | domain | deformation kinds |
|---|---|---|---|---|
{sets}

Defect rate {DEFECT_RATE}. Cell spec PL-5060100 (100 x 60 x 5 mm): a cell is swollen above 5 %
(0.25 mm). `{HELD_OUT_KIND}` never appears in training; only the anomaly score can catch it.

## Metrics

Held-out test set (new seeds, default domain), thresholds as shipped (set on good
validation cells so that the swollen, deformed and anomaly flags together reject at most 0.5 %):

| metric | target | FP32 | INT8 |
|---|---|---|---|
{chr(10).join(rows)}

INT8 against FP32, AUROC loss on the validation split: {json.dumps({k: round(v, 4) for k, v in loss.items()})}.

Per deformation kind (INT8, test set): share caught by the `deformed` output, by the
anomaly score, and rejected by any output (what the line does with the cell):

| kind | cells | deformed | anomaly | rejected |
|---|---|---|---|---|
{kinds}

Where it fails: low-frequency deformations (`warp`, a bend across the whole cell) and the
held-out `bent_corner` change the top view's shading much as in-spec swelling does, and
creases and dents near their limit look like the in-spec cosmetic marks good cells carry.
The side camera's thickness profile, not used by this model, sees bends directly.

## Intended use and limits

The model is trained on synthetic cells only. **Fine-tune it on recorded line data before
production.** Record and label cells from the line (`pouchline dataset record`, or
`pouchline dataset import` for crops from another system) and train on them with
`pouchline model train`. Two
assumptions must hold on the line: a top camera at roughly 4 px/mm, and a belt that
contrasts with the film's outline. Swollen recall is specified for swelling of at least
0.5 mm. Cells between the 0.25 mm spec limit and 0.5 mm are caught less reliably; the side
camera's thickness gauge should back them up. The anomaly score flags what is unusual,
not what is defective: new film colours or lighting raise it too.
"""
