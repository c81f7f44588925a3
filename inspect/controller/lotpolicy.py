"""How a lot is decided: a per-product policy over its cells' dispositions.

Two kinds of policy, chosen per product:

- ``threshold``: reject the lot when its defect rate exceeds ``reject_rate_pct`` or any
  cell's swelling exceeds ``max_swelling_mm`` (at once, even while the lot is open); hold it
  for QA when the rate exceeds ``hold_rate_pct``; accept it otherwise, when it closes.
- ``sampling``: ISO 2859-1 single sampling, normal inspection, at the product's AQL and
  inspection level: the first n cells of the lot are the sample; reject as soon as the
  defectives reach Re, accept once n cells are in with at most Ac.

With ``review_flagged`` a lot that would be accepted is held while flagged cells wait for
QA review. A fail-safe reject without a verdict (``no_verdict``) counts as defective: a
cell nobody inspected is not a good cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pouchline.inspect.controller.sampling import plan

Disposition = Literal["pending", "accept", "reject", "hold"]


class LotPolicy(BaseModel):
    """A product's lot policy (stored as JSON with the product)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["threshold", "sampling"] = Field("threshold", description="Which rule decides the lot.")
    reject_rate_pct: float = Field(2.0, ge=0, le=100, description="threshold: reject above this defect rate (%).")
    hold_rate_pct: float | None = Field(1.0, ge=0, le=100, description="threshold: hold for QA above this rate (%).")
    max_swelling_mm: float | None = Field(1.0, gt=0, description="Reject the lot when any cell swells more (mm).")
    aql: float = Field(0.65, description="sampling: acceptance quality limit (%), from the ISO 2859-1 series.")
    level: Literal["I", "II", "III"] = Field("II", description="sampling: general inspection level.")
    review_flagged: bool = Field(False, description="Hold an acceptable lot while flagged cells await QA review.")

    @model_validator(mode="after")
    def _consistent(self) -> LotPolicy:
        if self.hold_rate_pct is not None and self.hold_rate_pct > self.reject_rate_pct:
            raise ValueError(f"hold_rate_pct {self.hold_rate_pct} is above reject_rate_pct {self.reject_rate_pct}")
        if self.kind == "sampling":
            plan(1000, self.aql, self.level)  # an AQL outside the series fails here, naming the allowed values
        return self


@dataclass(frozen=True)
class LotCounts:
    """What the policy looks at, in cell order for sampling."""

    expected: int
    decisions: list[bool]  # True = rejected cell (defective or fail-safe), in arrival order
    max_swelling_mm: float | None
    unreviewed_flags: int
    closed: bool


@dataclass(frozen=True)
class LotDecision:
    disposition: Disposition
    reason: str
    final: bool  # a reject that need not wait for the lot to close


def decide(policy: LotPolicy, counts: LotCounts) -> LotDecision:
    """The lot's disposition now (``pending`` while it is open and nothing is final)."""
    if policy.max_swelling_mm is not None and counts.max_swelling_mm is not None \
            and counts.max_swelling_mm > policy.max_swelling_mm:
        return LotDecision("reject", f"a cell swelled {counts.max_swelling_mm:.2f} mm, over the "
                                     f"{policy.max_swelling_mm:.2f} mm limit", True)
    outcome = _sampling(policy, counts) if policy.kind == "sampling" else _threshold(policy, counts)
    if outcome.disposition == "accept" and policy.review_flagged and counts.unreviewed_flags:
        return LotDecision("hold", f"{outcome.reason}; {counts.unreviewed_flags} flagged cells await QA review", False)
    return outcome


def _threshold(policy: LotPolicy, counts: LotCounts) -> LotDecision:
    inspected = len(counts.decisions)
    defective = sum(counts.decisions)
    rate = 100.0 * defective / inspected if inspected else 0.0
    summary = f"{defective} of {inspected} cells rejected ({rate:.2f} %)"
    if counts.expected and 100.0 * defective / counts.expected > policy.reject_rate_pct:
        share = 100.0 * defective / counts.expected
        return LotDecision("reject", f"{defective} cells rejected, {share:.2f} % of the {counts.expected} in the lot: "
                                     f"over {policy.reject_rate_pct} %", True)
    if not counts.closed:
        return LotDecision("pending", summary, False)
    if rate > policy.reject_rate_pct:
        return LotDecision("reject", f"{summary}: over {policy.reject_rate_pct} %", True)
    if policy.hold_rate_pct is not None and rate > policy.hold_rate_pct:
        return LotDecision("hold", f"{summary}: over the {policy.hold_rate_pct} % hold limit", False)
    return LotDecision("accept", summary, False)


def _sampling(policy: LotPolicy, counts: LotCounts) -> LotDecision:
    sampling = plan(max(counts.expected, 2), policy.aql, policy.level)
    sample = counts.decisions[: sampling.sample_size]
    defective = sum(sample)
    verdict = sampling.decide(defective, len(sample))
    summary = (f"ISO 2859-1 level {policy.level}, AQL {policy.aql}: code {sampling.code_letter}, n={sampling.sample_size}, "
               f"Ac={sampling.accept}, Re={sampling.reject}; {defective} defective in {len(sample)}")
    if verdict == "reject":
        return LotDecision("reject", summary, True)
    if verdict == "accept":
        return LotDecision("accept", summary, False)
    if counts.closed:
        return LotDecision("hold", f"{summary}: the lot closed before the sample was complete", False)
    return LotDecision("pending", summary, False)
