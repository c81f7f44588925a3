"""`pouchline model reproduce`: rebuild the shipped detectors from nothing, with one command.

The line has two cameras per cell, and a model for each: the top view's detector (shaded
surface) and the side view's (the backlit silhouette). The steps:

1. Render the training data (default domain, one deformation kind held out entirely): top
   frames of 50,000 cells and side frames of the first 20,000 of them. The top model sees
   subtle surface marks and overfits 16,000 training cells (deformed AUROC 0.998 on them
   against 0.977 on validation); the side model's silhouettes need no more.
2. Render a test set (new seeds, every kind), a held-out-domain set and a set of good cells
   to calibrate the thresholds on, both views.
3. Train each view's model, then export FP32 and INT8; INT8 is calibrated on training frames.
4. Set both models' thresholds together, for the cell (`pouchline model calibrate`): on the
   good cells, steered by the defective cells of the training data's validation split.
5. Evaluate both precisions on both sets, cell by cell as the line decides (worst view
   wins), with each view's own metrics beside.
6. Write the model card with the measured numbers.

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
from pouchline.datasets.render import ViewName
from pouchline.datasets.synth import SynthConfig, default_workers, synthesize

#: The deformation kind the shipped model never sees in training (anomaly-score test).
HELD_OUT_KIND = "bent_corner"
MODEL_NAME = "pouchline-detector"
SIDE_MODEL_NAME = "pouchline-side"
#: Epochs of the top model: 12 over its 40,000 training cells fit the 45-minute budget
#: (1.9-4.1 min per epoch on the 2-core machine across two runs; 38 min in all, 2026-11-30).
TOP_EPOCHS = 12
#: The side model learns from a cleaner signal and converges in fewer epochs.
SIDE_EPOCHS = 12
#: The side model's share of the false-reject budget when it sets its thresholds alone, in
#: training (the top model has 0.005); the shipped thresholds are set for the cell (`CELL_TARGET_FRR`).
SIDE_TARGET_FRR = 0.0015
#: The line's false-reject budget on good cells, all flags of both views together.
CELL_TARGET_FRR = 0.005
TRAIN_KINDS = tuple(k for k in DEFORMATION_KINDS if k != HELD_OUT_KIND)
#: Cells per set; ``views`` overrides the count for one view (a view's cells are the first
#: ones of the seed, so the views of a cell still match by cell id).
SETS: dict[str, dict[str, Any]] = {
    "train": {"count": 20000, "seed": 200, "domain": "default", "kinds": TRAIN_KINDS, "views": {"top": 50000}},
    "test": {"count": 4000, "seed": 300, "domain": "default", "kinds": DEFORMATION_KINDS},
    "heldout": {"count": 4000, "seed": 400, "domain": "heldout", "kinds": DEFORMATION_KINDS},
    # Good cells only (with the in-spec marks good cells carry): where the thresholds are set.
    "calib": {"count": 10000, "seed": 500, "domain": "default", "kinds": TRAIN_KINDS, "defect_rate": 0.0},
}
DEFECT_RATE = 0.5


def _count(name: str, scale: float, view: ViewName = "top") -> int:
    settings = SETS[name]
    return max(int(settings.get("views", {}).get(view, settings["count"]) * scale), 50)


def _cells(name: str, scale: float) -> str:
    """A set's size for the model card: one count, or the top and side counts where they differ."""
    top, side = _count(name, scale, "top"), _count(name, scale, "side")
    return f"{top} cells" if top == side else f"{top} cells (top), {side} (side)"


def _synth(work: Path, name: str, scale: float, view: ViewName) -> Path:
    """One set's frames of one view (the views of a cell share its seed, so they match by cell id)."""
    settings = SETS[name]
    out = work / "data" / (name if view == "top" else f"{name}-{view}")
    config = SynthConfig(count=_count(name, scale, view), seed=settings["seed"],
                         defect_rate=settings.get("defect_rate", DEFECT_RATE),
                         domain=load_domain(settings["domain"]), kinds=settings["kinds"], views=(view,))
    synthesize(out, config, workers=default_workers(), resume=out.exists())
    return out


def _train(data: Path, run: Path, config: Any) -> float:
    """Train (resuming a cut-short run); the minutes its epochs took, from the training log,
    so a resumed run still reports the time its epochs took."""
    from pouchline.models.train import train

    if run.exists() and not (run / "checkpoint.pt").exists():
        shutil.rmtree(run)
    train(data, run, config, resume=(run / "checkpoint.pt").exists())
    log_lines = (run / "train_log.jsonl").read_text().splitlines()
    return sum(json.loads(line)["seconds"] for line in log_lines if line.strip()) / 60


def reproduce(out_dir: Path, work: Path, *, epochs: int = TOP_EPOCHS, seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Run every step; ``scale`` shrinks the datasets (for a quick check of the pipeline)."""
    from pouchline.models.bench import save_weights
    from pouchline.models.calibrate import MIN_REJECTS, calibrate
    from pouchline.models.evaluate import evaluate
    from pouchline.models.export import export
    from pouchline.models.train import TrainConfig

    console = Console()
    started = time.perf_counter()
    top = {name: _synth(work, name, scale, "top") for name in SETS}
    side = {name: _synth(work, name, scale, "side") for name in SETS}
    results: dict[str, Any] = {
        "train_minutes": _train(top["train"], work / "run", TrainConfig(epochs=epochs, seed=seed)),
        "side_train_minutes": _train(side["train"], work / "side-run", TrainConfig(
            epochs=min(epochs, SIDE_EPOCHS), seed=seed, view="side", target_frr=SIDE_TARGET_FRR)),
    }
    model, side_model = out_dir / f"{MODEL_NAME}.onnx", out_dir / f"{SIDE_MODEL_NAME}.onnx"
    # A shrunk validation split cannot judge INT8 to 0.005 AUROC (a few cells move it that
    # much): a quick check keeps the INT8 files, and the card reports the gate's verdict.
    force = scale < 1.0
    results["export"] = export(work / "run", model, int8=True, calib=top["train"], force=force)
    results["side_export"] = export(work / "side-run", side_model, int8=True, calib=side["train"], force=force)
    save_weights(work / "run", out_dir / f"{MODEL_NAME}.pt")
    files = {"fp32": (model, side_model), "int8": (Path(results["export"]["int8"]), Path(results["side_export"]["int8"]))}
    # A shrunk calibration set cannot resolve 0.5 %: a quick check calibrates at what it can.
    cell_target = max(CELL_TARGET_FRR, 2 * MIN_REJECTS / _count("calib", scale))
    for precision, paths in files.items():
        console.print(f"calibrating {precision} thresholds for the cell at a false-reject rate of {cell_target:.4f}")
        results[f"{precision}_calibration"] = calibrate(list(paths), [top["calib"], side["calib"]],
                                                        [top["train"], side["train"]], target_frr=cell_target,
                                                        plot=work / "eval" / f"{precision}-calibration.png")
        for name in ("test", "heldout"):
            console.print(f"evaluating {precision} on {name}: cells, top and side")
            cells = evaluate(list(paths), [top[name], side[name]], work / "eval" / f"{precision}-{name}")
            results[f"{precision}_{name}"] = cells["views"]["top"]
            results[f"{precision}_side_{name}"] = cells["views"]["side"]
            results[f"{precision}_cells_{name}"] = {key: value for key, value in cells.items() if key != "views"}
    results["total_minutes"] = (time.perf_counter() - started) / 60
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    (out_dir / "MODEL_CARD.md").write_text(model_card(results, epochs=epochs, seed=seed, scale=scale))
    return results


def _row(label: str, target: str, fp32: float, int8: float, fmt: str = "{:.4f}") -> str:
    return f"| {label} | {target} | {fmt.format(fp32)} | {fmt.format(int8)} |"


def _metric_rows(results: dict[str, Any], part: str) -> list[str]:
    """The target table of one part of the results: '' (top view), 'side_' or 'cells_'."""
    test, held = results[f"fp32_{part}test"], results[f"fp32_{part}heldout"]
    test8, held8 = results[f"int8_{part}test"], results[f"int8_{part}heldout"]
    drop = {p: max(r["swollen"]["recall"] - h["swollen"]["recall"], r["deformed"]["recall"] - h["deformed"]["recall"])
            for p, r, h in (("fp32", test, held), ("int8", test8, held8))}
    return [
        _row("swollen recall (>= 0.5 mm)", ">= 0.995", test["swollen"]["recall"], test8["swollen"]["recall"]),
        _row("deformed recall (trained kinds)", ">= 0.99", test["deformed"]["recall"], test8["deformed"]["recall"]),
        _row("false-reject rate, good cells (any flag)", "<= 0.005", test["false_reject_rate"], test8["false_reject_rate"]),
        _row(f"  the same, without good cells carrying an in-spec {HELD_OUT_KIND}", "",
             test["false_reject_rate_without_unseen_marks"], test8["false_reject_rate_without_unseen_marks"]),
        _row("swollen AUROC", "", test["swollen"]["auroc"], test8["swollen"]["auroc"]),
        _row("deformed AUROC", "", test["deformed"]["auroc"], test8["deformed"]["auroc"]),
        _row("swelling MAE (mm, 0-3 mm)", "<= 0.15", test["swelling_mae_mm"], test8["swelling_mae_mm"]),
        _row(f"unseen kind ({HELD_OUT_KIND}) flagged by anomaly", ">= 0.90", test["anomaly"]["recall_unseen"],
             test8["anomaly"]["recall_unseen"]),
        _row("held-out domain: largest recall drop", "<= 0.01", drop["fp32"], drop["int8"]),
        _row("held-out domain: swollen recall", "", held["swollen"]["recall"], held8["swollen"]["recall"]),
        _row("held-out domain: deformed recall", "", held["deformed"]["recall"], held8["deformed"]["recall"]),
        _row("held-out domain: false-reject rate", "", held["false_reject_rate"], held8["false_reject_rate"]),
    ]


def model_card(results: dict[str, Any], *, epochs: int, seed: int, scale: float) -> str:
    """The model card: what the models are, how they were made, what they measured, where they fail."""
    header = "| metric | target | FP32 | INT8 |\n|---|---|---|---|\n"
    tables = {part: header + "\n".join(_metric_rows(results, part)) for part in ("cells_", "", "side_")}
    cell_kinds = results["int8_cells_test"].get("per_kind", {})
    per_view = {view: results[f"int8_{part}test"].get("per_kind", {}) for view, part in (("top", ""), ("side", "side_"))}
    kinds = "\n".join(
        f"| {kind} | {row['cells']} | {row['rejected']:.3f} | {per_view['top'].get(kind, {}).get('rejected', float('nan')):.3f} | "
        f"{per_view['side'].get(kind, {}).get('rejected', float('nan')):.3f} | {row['deformed_recall']:.3f} | "
        f"{row['anomaly_recall']:.3f} |" for kind, row in cell_kinds.items())
    losses = {name: {k: round(v, 4) for k, v in results[key].get("auroc_loss", {}).items()}
              for name, key in ((MODEL_NAME, "export"), (SIDE_MODEL_NAME, "side_export"))}
    passed = {kind: 1.0 - cell_kinds.get(kind, {}).get("rejected", float("nan")) for kind in ("dent", "crease")}
    held = results["int8_heldout"]
    forced = "".join(f"\n**Not enforced (a quick check at scale {scale}):** {results[key]['forced']}."
                     for key in ("export", "side_export") if "forced" in results[key])
    sets = "\n".join(f"| {name} | {_cells(name, scale)} | seed {s['seed']} | {s['domain']} | "
                     f"{', '.join(s['kinds'])} |" for name, s in SETS.items())
    return f"""# Model card: {MODEL_NAME} and {SIDE_MODEL_NAME}

Two compact CNNs (about 0.3 M parameters each, the same architecture), trained from
scratch, one per camera of an inspection station:

- `{MODEL_NAME}` judges the aligned **top-view** crop of a cell (208x112): the shaded film,
  where dents, creases, wrinkles and damaged tabs show;
- `{SIDE_MODEL_NAME}` judges the **side view**: the cell's silhouette against a backlight,
  cut out by `pouchline.models.sidelocate` in body lengths (256x64), where thickness,
  bends and lifted corners show.

Each outputs:

- the probability of `swollen` and of `deformed`;
- a coarse defect heat map;
- the swelling in mm (a virtual thickness gauge; a cell reports the side view's, which
  measures it);
- an anomaly score: the Mahalanobis distance from good cells in embedding space, computed
  inside the ONNX graph.

The top model scores each crop together with its mirror image across the long axis and
reports the pair's average (the anomaly score excepted; training mirrors crops the same
way): twice the compute per crop, fewer good cells scoring high and fewer defects scoring
low. The side model does not (a mirrored side view is no cell: the belt is always below).

The line rejects a cell when any view flags it (worst view wins).

Files, for each `NAME`:

- `NAME.onnx`: FP32.
- `NAME.int8.onnx`: static INT8, QDQ, per-channel; the uint8 pixels go straight into the
  quantised stem convolution (see `pouchline.models.stemquant`).
- A metadata JSON next to each file: view, input size, normalisation, classes, thresholds,
  swelling calibration, training-data hash, metrics, SHA-256.
- `{MODEL_NAME}.pt`: the top model's weights for PyTorch, used by `pouchline bench model`.

## Reproduce

```
pouchline model reproduce --out models/ --work runs/reproduce
```

Seed {seed}; the top model trains {epochs} epochs ({results['train_minutes']:.1f} min in all, from the training log)
and the side model {min(epochs, SIDE_EPOCHS)} ({results['side_train_minutes']:.1f} min), on the project's 2-core
CPU machine. The command that wrote this card took {results['total_minutes']:.0f} min; it reuses whatever its
work folder already holds (rendered sets, finished training runs).

## Training data (synthetic, `pouchline dataset synth`)

| set | size | seeds | domain | deformation kinds |
|---|---|---|---|---|
{sets}

Each set has a top and a side frame of every cell (stored as two datasets, `NAME` and
`NAME-side`, matched by cell id); the training set's cells past the side count have a top
frame only. Defect rate {DEFECT_RATE}. Cell spec PL-5060100
(100 x 60 x 5 mm): a cell is swollen above 5 % (0.25 mm). `{HELD_OUT_KIND}` never appears in
training; only the anomaly scores can catch it.

The thresholds belong to the cell, not to each model (`pouchline model calibrate`): all six
flags (each view's swollen, deformed and anomaly) together may reject
{results['int8_calibration']['target_frr'] * 100:.1f} % of the {results['int8_calibration']['good_cells']} good cells of the `calib` set, and
that budget goes, step by step, to the flag that catches the most more defective cells of
the training data's validation split per good cell it rejects. Good cells rejected on the
calibration set: {results['int8_calibration']['good_rejected'] * 100:.2f} % (INT8), with
{json.dumps(results['int8_calibration']['rejects'])} good cells per flag.

## Metrics: cells, as the line decides them

Held-out test set (new seeds, default domain), both cameras, thresholds as shipped:

{tables["cells_"]}

Per deformation kind (INT8, test set): share of cells rejected by the line, by each view
alone, and caught by a `deformed` flag or an anomaly flag of either view:

| kind | cells | rejected | top alone | side alone | deformed | anomaly |
|---|---|---|---|---|---|---|
{kinds}

## Each view alone

Top view (`{MODEL_NAME}`), per frame:

{tables[""]}

Side view (`{SIDE_MODEL_NAME}`), per frame:

{tables["side_"]}

INT8 against FP32, AUROC loss on the validation split: {json.dumps(losses)}.{forced}

## Where it fails

- Dents and creases change the film's shading, not the silhouette: only the top view sees
  them, and near their limit they look like the in-spec cosmetic marks good cells carry.
  The calibration spends nearly the whole budget on the top model's `deformed` flag, and
  still {passed['dent']:.1%} of the dents and {passed['crease']:.1%} of the creases pass.
- The thresholds are set for the pair. Either model run alone catches less than its
  metadata's target suggests: the top model's `swollen` flag, for one, is set almost off,
  since the side view's gauge measures swelling. The inspection service warns when a model
  runs without the models it was calibrated with.
- The training domain spans rigs on both sides of each setting of the held-out domain
  (light placement, colour and power, noise, blur, camera height: bands with a gap, see
  `datasets/domains/default.json`); the held-out domain lies in those gaps, with a film colour
  (blue) and JPEG qualities training never drew. There the top model's defect flags reject
  {held['false_reject_rate_defect_outputs']:.1%} of the good cells. A rig outside the training bands altogether is not
  measured by that: a line must check its false-reject rate on its own good cells, set its
  thresholds on them (`pouchline model calibrate`) and fine-tune on its own cells (below).
- The wide domain is hard on the subtle kinds: more sensor noise or dimmer light hides a
  dent or crease near its limit, and nearly every training frame has some knob in a far band.

## Intended use and limits

The models are trained on synthetic cells only. **Fine-tune them on recorded line data
before production.** Record and label cells from the line (`pouchline dataset record`, or
`pouchline dataset import` for crops from another system) and train on them with
`pouchline model train [--view side]`. Assumptions that must hold on the line: a top
camera at roughly 4 px/mm over a belt that contrasts with the film's outline; a side
camera level with the belt, looking at a backlight panel across it, the cell's tab end on
the image's right and the whole cell in view. Swollen recall is specified for swelling of
at least 0.5 mm. The anomaly scores flag what is unusual, not what is defective: new film
colours or lighting raise them too.
"""
