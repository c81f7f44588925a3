"""Views to cells: worst view wins, and a cell whose views do not all arrive in time is rejected.

The collector feeds every frame verdict here, from any worker, in any order, possibly twice
(a frame redelivered after its worker was presumed dead). A cell is decided when all its
views are in, or at its deadline, whichever comes first; it passes only when every view
was inspected and passed. Nothing here reads a clock: times are arguments, so the rules
are tested exactly.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from pouchline.inspect.verdicts import CellVerdict, FrameVerdict

#: Decided cells remembered to recognise duplicates and late views.
_REMEMBERED = 100_000


@dataclass
class _Open:
    expected: int
    first_seen: float
    t_capture: float
    frames: dict[tuple[str, str], tuple[FrameVerdict, list[bytes]]] = field(default_factory=dict)

    @property
    def deadline_base(self) -> float:
        # Capture time on the station's clock, unless that clock runs ahead of ours.
        return min(self.t_capture, self.first_seen)


@dataclass(frozen=True)
class Decided:
    """A cell verdict and its attachment parts, ready to send."""

    verdict: CellVerdict
    attachments: list[bytes]


def audit_sampled(cell_id: str, rate: float) -> bool:
    """Whether a passed cell goes to audit: a hash of its id, so every worker agrees without talking."""
    return rate > 0 and int.from_bytes(hashlib.sha256(cell_id.encode()).digest()[:8], "big") < rate * 2**64


class CellAggregator:
    """Open cells by id; `add` and `expire` return the cells they decide."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.counts: Counter[str] = Counter()
        self._open: dict[str, _Open] = {}
        self._decided: OrderedDict[str, frozenset[tuple[str, str, int]]] = OrderedDict()

    @property
    def open_cells(self) -> int:
        return len(self._open)

    def add(self, verdict: FrameVerdict, attachments: list[bytes], now: float) -> Decided | None:
        """Take one view's verdict; the cell's verdict if this completed it."""
        cell_id = verdict.cell_id
        self.counts["frame_verdicts"] += 1
        decided = self._decided.get(cell_id)
        if decided is not None:
            self.counts["duplicate_views" if verdict.key in decided else "late_views"] += 1
            return None
        cell = self._open.get(cell_id)
        if cell is None:
            cell = self._open[cell_id] = _Open(verdict.views, now, verdict.t_capture)
        slot = (verdict.camera, verdict.view)
        if slot in cell.frames:
            self.counts["duplicate_views"] += 1
            return None
        cell.frames[slot] = (verdict, attachments)
        cell.expected = max(cell.expected, verdict.views)
        cell.t_capture = min(cell.t_capture, verdict.t_capture)
        if len(cell.frames) < cell.expected:
            return None
        return self._decide(cell_id, now)

    def expire(self, now: float) -> list[Decided]:
        """Decide every cell whose deadline has passed (missing views make it a reject)."""
        late = [cell_id for cell_id, cell in self._open.items() if now >= cell.deadline_base + self.deadline_s]
        return [self._decide(cell_id, now) for cell_id in late]

    def flush(self, now: float) -> list[Decided]:
        """Decide every open cell now (shutdown): incomplete ones are rejected."""
        return [self._decide(cell_id, now) for cell_id in list(self._open)]

    def _decide(self, cell_id: str, now: float) -> Decided:
        cell = self._open.pop(cell_id)
        frames = sorted(cell.frames.values(), key=lambda item: (item[0].camera, item[0].view))
        reasons = list(dict.fromkeys(reason for verdict, _ in frames for reason in verdict.reasons))
        missing = cell.expected - len(frames)
        if missing:
            reasons.append("missing_view")
            self.counts["deadline_misses"] += 1
        judged = [verdict for verdict, _ in frames if verdict.status != "skipped"]
        if not judged and not missing:
            reasons.append("not_inspected")
        reject = bool(missing) or not judged or any(verdict.decision == "reject" for verdict in judged)
        parts: list[bytes] = []
        renumbered = []
        for verdict, data in frames:
            listed = [item.model_copy(update={"part": len(parts) + item.part}) for item in verdict.attachments]
            parts.extend(data)
            renumbered.append(verdict.model_copy(update={"attachments": listed}))
        first = frames[0][0]
        result = CellVerdict(
            station=first.station, lot=first.lot, cell=first.cell, decision="reject" if reject else "pass",
            reasons=reasons[:64], views_expected=cell.expected, frames=renumbered, t_capture=cell.t_capture,
            t_decided=now, audit=not reject and bool(parts),
        )
        self._decided[cell_id] = frozenset(verdict.key for verdict, _ in frames)
        if len(self._decided) > _REMEMBERED:
            self._decided.popitem(last=False)
        self.counts["cells"] += 1
        self.counts["cells_rejected" if reject else "cells_passed"] += 1
        for reason in reasons:
            self.counts[f"reject_reason:{reason}"] += 1
        return Decided(result, parts)
