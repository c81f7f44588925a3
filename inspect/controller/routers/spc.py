"""SPC charts per product and supplier batch, as JSON for the web page to draw."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy import select

from pouchline.inspect.controller.deps import DbSession, Operator
from pouchline.inspect.controller.schema import Product, SupplierBatch
from pouchline.inspect.controller.spcwatch import PHASE_ONE, charts

router = APIRouter(prefix="/api/v1/spc", tags=["spc"])


@router.get("")
def spc(request: Request, session: DbSession, _: Operator, product: Annotated[str, Query(max_length=64)],
        batch: Annotated[str | None, Query(max_length=64)] = None) -> dict[str, Any]:
    """X-bar and R of the swelling estimate, p of the reject rate; limits from the product's first
    subgroups (its baseline); Western Electric violations per chart."""
    row = session.scalar(select(Product).where(Product.name == product))
    if row is None:
        raise HTTPException(404, f"no product {product!r}")
    supplier = None
    if batch is not None:
        supplier = session.scalar(select(SupplierBatch).where(SupplierBatch.code == batch,
                                                              SupplierBatch.product_id == row.id))
        if supplier is None:
            raise HTTPException(404, f"no supplier batch {batch!r} of {product!r}")
    settings = request.app.state.settings
    found = charts(session, row, supplier, settings.spc_subgroup, settings.spc_rate_subgroup)
    return {"product": product, "batch": batch, "subgroup": settings.spc_subgroup,
            "rate_subgroup": settings.spc_rate_subgroup, "baseline_subgroups": PHASE_ONE,
            "charts": {name: chart.to_json() for name, chart in found.items()}}
