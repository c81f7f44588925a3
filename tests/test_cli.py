"""The `pouchline` command end to end: synth, info, sheet, validate, resume, bench, placeholders."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from pouchline.datasets.manifest import MANIFEST, DatasetReader
from pouchline.inspect.cli import app

runner = CliRunner()


def invoke(*args: str, raw: bool = False) -> tuple[int, str]:
    """Exit code and output (whitespace collapsed: rich wraps long lines)."""
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output if raw else " ".join(result.output.split())


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def test_version() -> None:
    code, out = invoke("--version")
    assert code == 0 and out.strip() == f"pouchline {metadata.version('pouchline')}"


def test_synth_info_sheet_validate(tmp_path: Path) -> None:
    data = tmp_path / "cells"
    code, out = invoke("dataset", "synth", "--out", str(data), "--count", "12", "--seed", "5", "--view", "both",
                       "--defect-rate", "0.6", "--workers", "1")
    assert code == 0, out
    assert "wrote 24 frames of 12 cells" in out
    records = list(DatasetReader(data))
    assert len(records) == 24 and {r.view for r in records} == {"top", "side"}
    assert all(r.ground_truth is not None and r.ground_truth.seed == 5 for r in records)

    code, out = invoke("dataset", "info", str(data), "--json", raw=True)
    assert code == 0, out
    summary = json.loads(out)
    assert summary["frames"] == 24 and summary["cells"] == 12
    assert sum(summary["labels"].values()) >= 24

    sheet = tmp_path / "sheet.png"
    code, out = invoke("dataset", "sheet", str(data), "--out", str(sheet), "--count", "10", "--columns", "5")
    assert code == 0, out
    image = cv2.imread(str(sheet))
    assert image is not None and image.shape[1] > 5 * 240

    code, out = invoke("dataset", "validate", str(data))
    assert code == 0 and "24 records, all valid" in out


def test_synth_refuses_an_existing_dataset_and_resumes_a_torn_one(tmp_path: Path) -> None:
    args = ["dataset", "synth", "--count", "8", "--seed", "2", "--workers", "1"]
    full, torn = tmp_path / "full" / "cells", tmp_path / "torn" / "cells"
    assert invoke(*args, "--out", str(full))[0] == 0
    assert invoke(*args, "--out", str(torn))[0] == 0
    code, out = invoke(*args, "--out", str(torn))
    assert code == 2 and "--resume" in out

    manifest = torn / MANIFEST
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(b"".join(lines[:5]) + lines[5][:40])  # crash in the middle of line 6
    with pytest.warns(UserWarning, match="torn last line"):
        code, out = invoke(*args, "--out", str(torn), "--resume")
    assert code == 0, out
    assert "3 frames of 3 cells" in out and "5 already there" in out
    assert tree_digest(torn) == tree_digest(full)

    code, out = invoke("dataset", "synth", "--count", "9", "--seed", "2", "--workers", "1", "--out", str(torn), "--resume")
    assert code == 2 and "other synth settings" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--kinds", "dent,bogus"], "unknown kind(s) bogus"),
        (["--size", "640by480"], "WIDTHxHEIGHT"),
        (["--domain", "nowhere.json"], "neither a built-in"),
        (["--view", "front"], "views"),
    ],
)
def test_synth_bad_arguments_are_named(tmp_path: Path, extra: list[str], message: str) -> None:
    code, out = invoke("dataset", "synth", "--out", str(tmp_path / "x"), "--count", "2", *extra)
    assert code == 2
    assert message in out


def test_synth_workers_do_not_change_the_dataset(tmp_path: Path) -> None:
    args = ["dataset", "synth", "--count", "6", "--seed", "8", "--view", "both", "--defect-rate", "0.7"]
    assert invoke(*args, "--out", str(tmp_path / "one" / "cells"), "--workers", "1")[0] == 0
    assert invoke(*args, "--out", str(tmp_path / "two" / "cells"), "--workers", "2")[0] == 0
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_validate_reports_problems_with_exit_1(tmp_path: Path) -> None:
    data = tmp_path / "d"
    assert invoke("dataset", "synth", "--out", str(data), "--count", "3", "--workers", "1")[0] == 0
    first = next(iter(DatasetReader(data)))
    (data / first.image).write_bytes(b"not a jpeg")
    code, out = invoke("dataset", "validate", str(data), raw=True)
    assert code == 1
    # One line per problem, never broken inside a path, however long the path is.
    line = next(line for line in out.splitlines() if "error:" in line and "sha256" in line)
    assert f"{data / 'manifest.jsonl'}:1" in line


def test_bench_synth_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "synth.json"
    code, out = invoke("bench", "synth", "--frames", "20", "--workers", "2", "--json", str(report))
    assert code == 0, out
    data = json.loads(report.read_text())
    assert set(data) == {"bench", "machine", "results", "figures", "ratios"}
    assert data["bench"] == "synth" and data["machine"]["cores"] >= 1
    assert data["figures"]["frames_per_s_1core"] > 0
    assert {"jpeg_vs_render_only", "side_vs_top", "2workers_vs_1core"} <= set(data["ratios"])
    assert len(data["results"]) == 4


def test_bench_reports_stay_readable_in_80_columns() -> None:
    import io

    from rich.console import Console

    from pouchline.inspect.benchreport import BenchReport

    report = BenchReport("demo", results=[{"case": f"system {i} jpeg saturation", "offered": 3000, "received": 2999,
                                           "frames_per_s": 5386.2, "p50_ms": 2.44, "p99_ms": 10.45,
                                           "sender_cpu_ms_per_frame": 0.179, "receiver_cpu_ms_per_frame": 0.091}
                                          for i in range(3)],
                         figures={"silent_drops": 0}, ratios={"fps_vs_imagezmq_reqrep_jpeg": 0.9})
    for width in (80, 200):
        out = io.StringIO()
        report.print(Console(file=out, width=width, color_system=None))
        text = out.getvalue()
        assert max(len(line) for line in text.splitlines()) <= width
        assert all(f"system {i} jpeg saturation" in text for i in range(3))  # never cut to "system 1 jp…"
        assert "fps_vs_imagezmq_reqrep_jpeg = 0.9" in text and "5386" in text


def test_the_configuration_reference_is_generated_from_the_models() -> None:
    from pouchline.inspect.configdocs import reference

    committed = (Path(__file__).parent.parent / "CONFIG.md").read_text()
    assert committed == reference(), "CONFIG.md is stale: run `pouchline config-reference --out CONFIG.md`"
    for key in ("`cell_deadline_s`", "`batching.max_batch`", "`deadline_s`", "`cameras.source.drift_after`", "`aql`"):
        assert key in committed
