"""`pouchline evaluate`: a labelled recording through the real pipeline, scored like offline evaluation.

The dataset is replayed by a real station (replay source, as fast as the workers take it)
through the real transport to the real inspection service with the model under test; the
collector's cell verdicts are matched to the dataset's records and scored with the same
`compute_metrics` as `pouchline model eval`, so both report the same numbers for the same
model on the same frames (tested within 0.5 points). On top: precision per defect, the lot
outcomes under a lot policy, capture-to-verdict latency, and with ``compare`` the cells
where two models disagree, each with its image and both models' heat maps.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

from pouchline.datasets.manifest import DatasetReader  # noqa: E402
from pouchline.inspect.aggregate import Decided  # noqa: E402
from pouchline.inspect.config import InspectConfig  # noqa: E402
from pouchline.inspect.controller.lotpolicy import LotCounts, LotPolicy, decide  # noqa: E402
from pouchline.inspect.service import InspectService  # noqa: E402
from pouchline.inspect.verdicts import CellVerdict, FrameVerdict  # noqa: E402
from pouchline.models.evaluate import Scored, compute_metrics  # noqa: E402
from pouchline.models.inference import Inferencer, Prediction  # noqa: E402
from pouchline.station.config import StationConfig  # noqa: E402
from pouchline.station.service import Station  # noqa: E402

_IDLE_S = 20.0  # no new verdict for this long: the run is over (what is missing is reported)


@dataclass
class Run:
    """One model's pass over the recording."""

    name: str
    model: Path
    cells: dict[str, CellVerdict]  # by cell id (station/lot/cell)
    images: Path  # where the run's attachments are, by sha256
    wall_s: float


def replay_through_pipeline(data: Path, model: Path, out: Path, *, workers: int | None, keep_images: bool,
                            progress: Progress) -> Run:
    """Replay ``data`` through a station and an inspection service running ``model``."""
    reader = DatasetReader(data)
    records = list(reader)
    cells_expected = len({record.cell for record in records})
    view = Inferencer(model).meta.input.view
    skip = sorted({record.view for record in records} - {view})
    station = Station(StationConfig.model_validate({
        "name": "replay", "bind": "tcp://127.0.0.1:0", "status": None,
        "cameras": [{"name": "replay", "view": view, "cells": "source",
                     "source": {"kind": "replay", "path": str(data), "fast": True}}],
    }))
    decided: dict[str, CellVerdict] = {}
    out.mkdir(parents=True, exist_ok=True)

    def keep(item: Decided) -> None:
        decided[item.verdict.cell_id] = item.verdict

    config = InspectConfig(stations=[station.server.endpoint], collect="tcp://127.0.0.1:0", http=None, model=model,
                           more_models=[], skip_views=skip, watch_model=False, cell_deadline_s=30.0, audit_rate=1.0 if keep_images else 0.0,
                           out=out / "verdicts.jsonl", **({"workers": workers} if workers else {}))
    service = InspectService(config)
    assert service.collector is not None
    service.collector.on_cell = keep
    service.start()
    task = progress.add_task(f"{model.name} through the pipeline", total=cells_expected)
    started = time.monotonic()
    try:
        while len(service.collector.workers) < len(service.names) and time.monotonic() - started < 120:
            time.sleep(0.1)
        station.start()
        begin, seen, idle_since = time.monotonic(), 0, time.monotonic()
        while seen < cells_expected and time.monotonic() - idle_since < _IDLE_S:
            time.sleep(0.2)
            if len(decided) != seen:
                seen, idle_since = len(decided), time.monotonic()
            progress.update(task, completed=seen)
        wall = time.monotonic() - begin
    finally:
        station.stop()
        service.stop()
    return Run(model.stem, model, dict(decided), out / "verdicts.jsonl.images", wall)


def _prediction(frame: FrameVerdict) -> Prediction:
    nan = float("nan")
    return Prediction(status=frame.status if frame.status in ("ok", "no_cell", "partial_cell") else "no_cell",  # type: ignore[arg-type]
                      probs=dict(frame.probs), flagged=[r for r in frame.reasons if frame.status == "ok"],
                      anomaly=frame.anomaly if frame.anomaly is not None else nan,
                      swelling_mm=frame.swelling_mm if frame.swelling_mm is not None else nan)


def score(run: Run, reader: DatasetReader, model: Inferencer) -> tuple[dict[str, Any], list[Scored]]:
    """The run's verdicts matched to the records, scored as `pouchline model eval` scores."""
    records = {(r.lot, r.cell, r.view): r for r in reader if r.view == model.meta.input.view}
    scored = []
    for verdict in run.cells.values():
        for frame in verdict.frames:
            record = records.get((frame.lot, frame.cell, frame.view))
            if record is not None:
                scored.append(Scored(record, _prediction(frame)))
    metrics = compute_metrics(scored, model.meta)
    metrics["cells_missing"] = len({(r.lot, r.cell) for r in records.values()}) - len(run.cells)
    for name in model.meta.outputs:
        flagged = [s for s in scored if name in s.prediction.flagged]
        if isinstance(metrics.get(name), dict):
            metrics[name]["precision"] = (float(np.mean([name in s.record.labels for s in flagged]))
                                          if flagged else float("nan"))
    latency = np.array([(v.t_decided - v.t_capture) * 1000.0 for v in run.cells.values()])
    metrics["latency_ms"] = {f"p{q}": float(np.percentile(latency, q)) for q in (50, 90, 99)} if len(latency) else {}
    metrics["cells_per_s"] = len(run.cells) / run.wall_s if run.wall_s else float("nan")
    return metrics, scored


def lot_outcomes(run: Run, policy: LotPolicy) -> dict[str, dict[str, Any]]:
    """Each recorded lot decided under ``policy`` from the pipeline's cell decisions."""
    lots: dict[str, list[CellVerdict]] = defaultdict(list)
    for verdict in run.cells.values():
        lots[verdict.lot].append(verdict)
    outcomes = {}
    for lot, cells in sorted(lots.items()):
        cells.sort(key=lambda v: v.t_capture)
        swellings = [f.swelling_mm for v in cells for f in v.frames if f.swelling_mm is not None]
        counts = LotCounts(expected=len(cells), decisions=[v.decision == "reject" for v in cells],
                           max_swelling_mm=max(swellings) if swellings else None, unreviewed_flags=0, closed=True)
        result = decide(policy, counts)
        outcomes[lot] = {"cells": len(cells), "rejected": sum(counts.decisions), "disposition": result.disposition,
                         "reason": result.reason}
    return outcomes


def _bar_chart(metrics: dict[str, Any], outputs: list[str], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.2))
    names = [*outputs, "false rejects"]
    recall = [metrics[n]["recall"] for n in outputs] + [metrics.get("false_reject_rate", float("nan"))]
    precision = [metrics[n].get("precision", float("nan")) for n in outputs] + [float("nan")]
    x = np.arange(len(names))
    axis.bar(x - 0.2, recall, 0.4, label="recall (rate for false rejects)")
    axis.bar(x + 0.2, precision, 0.4, label="precision")
    axis.set_xticks(x, names)
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _latency_chart(run: Run, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.hist([(v.t_decided - v.t_capture) * 1000.0 for v in run.cells.values()], bins=40)
    axis.set_xlabel("capture to cell verdict, ms (replayed as fast as the workers take frames)")
    axis.set_ylabel("cells")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _disagreements(first: Run, second: Run) -> list[tuple[CellVerdict, CellVerdict]]:
    return [(first.cells[key], second.cells[key]) for key in sorted(first.cells)
            if key in second.cells and first.cells[key].decision != second.cells[key].decision]


def _image_file(run: Run, sha: str, report: Path) -> str | None:
    for path in run.images.glob(f"{sha}.*"):
        target = report / "images" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(path, target)
        return f"images/{path.name}"
    return None


def _stack(run: Run, verdict: CellVerdict, report: Path) -> str:
    frame = next((f for f in verdict.frames if f.attachments), None)
    if frame is None:
        return "<p>no image</p>"
    files = {item.kind: _image_file(run, item.sha256, report) for item in frame.attachments}
    layer = f'<img class="layer" src="{files["overlay"]}">' if files.get("overlay") else ""
    return (f'<div class="stack"><img src="{files.get("image")}">{layer}</div>'
            f"<p>{html.escape(run.name)}: <b>{verdict.decision}</b> {html.escape(', '.join(verdict.reasons))}</p>")


def write_report(report: Path, runs: list[Run], results: list[dict[str, Any]], outputs: list[str]) -> None:
    """report.html with the plots, lot outcomes and disagreements; evaluation.json beside it."""
    sections = []
    for run, result in zip(runs, results):
        _bar_chart(result["metrics"], outputs, report / f"{run.name}-recall.png")
        _latency_chart(run, report / f"{run.name}-latency.png")
        m = result["metrics"]
        rows = "".join(f"<tr><td>{html.escape(lot)}</td><td>{o['cells']}</td><td>{o['rejected']}</td>"
                       f"<td>{o['disposition']}</td><td>{html.escape(o['reason'])}</td></tr>"
                       for lot, o in result["lots"].items())
        figures = ", ".join(f"{n} recall {m[n]['recall']:.4f} / precision {m[n].get('precision', float('nan')):.4f}"
                            for n in outputs)
        sections.append(
            f"<h2>{html.escape(run.name)}</h2><p>{html.escape(str(run.model))}</p>"
            f"<p>{m['images']} frames judged, {m.get('cells_missing', 0)} cells missing; {figures}; false-reject rate "
            f"{m.get('false_reject_rate', float('nan')):.4f}; latency p50 {m['latency_ms'].get('p50', float('nan')):.1f} "
            f"ms, p99 {m['latency_ms'].get('p99', float('nan')):.1f} ms at {m['cells_per_s']:.0f} cells/s</p>"
            f'<img src="{run.name}-recall.png"> <img src="{run.name}-latency.png">'
            f"<h3>Lots under the policy</h3><table><tr><th>lot</th><th>cells</th><th>rejected</th><th>disposition</th>"
            f"<th>why</th></tr>{rows}</table>")
    if len(runs) == 2:
        pairs = _disagreements(*runs)
        cards = "".join(f"<div class='pair'><h4>{html.escape(a.cell_id)}</h4><div class='row'><div>"
                        f"{_stack(runs[0], a, report)}</div><div>{_stack(runs[1], b, report)}</div></div></div>"
                        for a, b in pairs)
        sections.append(f"<h2 id='disagreements'>Disagreements: {len(pairs)} cells</h2>{cards or '<p>none</p>'}")
    style = ("body{font-family:system-ui,sans-serif;margin:2rem;max-width:1300px}table{border-collapse:collapse}"
             "td,th{border-bottom:1px solid #ddd;padding:.2rem .5rem;text-align:left}.pair{display:inline-block;"
             "margin:.5rem;vertical-align:top}.row{display:flex;gap:8px}.stack{position:relative;display:inline-block;width:320px}"
             ".stack img{width:320px;display:block}.stack img.layer{position:absolute;left:0;top:0;height:100%}")
    (report / "report.html").write_text(f"<!doctype html><meta charset='utf-8'><title>pouchline evaluate</title>"
                                        f"<style>{style}</style><h1>pouchline evaluate</h1>{''.join(sections)}")


def evaluate_pipeline(data: Path, model: Path, report: Path, *, compare: Path | None = None,
                      policy: LotPolicy | None = None, workers: int | None = None) -> dict[str, Any]:
    """Replay ``data`` with ``model`` (and ``compare``) through the pipeline; write the report; the results."""
    report.mkdir(parents=True, exist_ok=True)
    reader = DatasetReader(data)
    policy = policy or LotPolicy()
    models = [model] if compare is None else [model, compare]
    names = [m.stem for m in models]
    if len(set(names)) != len(names):
        names = [f"{i + 1}-{n}" for i, n in enumerate(names)]
    runs, results = [], []
    with Progress() as progress:
        for name, path in zip(names, models):
            run = replay_through_pipeline(data, path, report / "runs" / name, workers=workers,
                                          keep_images=compare is not None, progress=progress)
            run.name = name
            inferencer = Inferencer(path)
            metrics, _ = score(run, reader, inferencer)
            runs.append(run)
            results.append({"model": str(path), "model_sha256": inferencer.meta.sha256, "metrics": metrics,
                            "lots": lot_outcomes(run, policy)})
    outputs = list(Inferencer(model).meta.outputs)
    write_report(report, runs, results, outputs)
    summary = {"data": str(data), "policy": policy.model_dump(), "runs": results}
    if compare is not None:
        summary["disagreements"] = [a.cell_id for a, _ in _disagreements(*runs)]
    (report / "evaluation.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
