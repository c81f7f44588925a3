"""Products (spec and lot policy), supplier batches, users and API tokens: admin's business."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from pouchline.inspect.controller.auth import ROLES, Role, hash_password, new_token
from pouchline.inspect.controller.deps import Admin, DbSession, Operator
from pouchline.inspect.controller.ledger import audit, utcnow
from pouchline.inspect.controller.lotpolicy import LotPolicy
from pouchline.inspect.controller.schema import ApiToken, Line, Product, SupplierBatch, User

router = APIRouter(prefix="/api/v1", tags=["admin"])


class LineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    stations: list[str] = Field(default_factory=list, max_length=64, description="Station names on this line.")


class CellSpecIn(BaseModel):
    """The cell's nominal dimensions (the swelling % and the review page refer to them)."""

    model_config = ConfigDict(extra="forbid")

    length_mm: float | None = Field(None, gt=0, le=2000, description="Body length.")
    width_mm: float | None = Field(None, gt=0, le=2000, description="Body width.")
    thickness_mm: float | None = Field(None, gt=0, le=100, description="Nominal thickness.")


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    spec: CellSpecIn = Field(default_factory=CellSpecIn, description="Nominal cell dimensions.")
    policy: LotPolicy = Field(default_factory=LotPolicy, description="How its lots are decided.")


class ProductOut(ProductIn):
    id: int


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=64)
    supplier: str = Field(min_length=1, max_length=128)
    product: str


class BatchOut(BatchIn):
    id: int


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=2, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role
    password: str = Field(min_length=8, max_length=256)


class UserOut(BaseModel):
    name: str
    role: str
    disabled: bool
    created_at: datetime


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=2, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role = Field("operator", description="What the token may do, as a user of this role.")
    scopes: list[Literal["read", "write"]] = Field(
        default_factory=lambda: ["read", "write"], min_length=1, max_length=2,
        description="'read': GET requests; 'write': changes too (within the role).",
    )


class TokenOut(BaseModel):
    name: str
    role: str
    token: str = Field(description="Shown once; only its SHA-256 is kept.")


@router.get("/lines", response_model=list[LineIn])
def list_lines(session: DbSession, _: Operator) -> list[LineIn]:
    return [LineIn(name=line.name, stations=line.stations) for line in session.scalars(select(Line).order_by(Line.name))]


@router.put("/lines/{name}", response_model=LineIn)
def put_line(name: str, body: LineIn, session: DbSession, who: Admin) -> LineIn:
    if body.name != name:
        raise HTTPException(422, f"body names line {body.name!r}, the path {name!r}")
    line = session.scalar(select(Line).where(Line.name == name))
    if line is None:
        line = Line(name=name)
        session.add(line)
    line.stations = list(body.stations)
    audit(session, who.name, "line_saved", name, stations=line.stations)
    session.commit()  # committed before the reply: the caller may act on it at once
    return LineIn(name=line.name, stations=line.stations)


def _product_out(product: Product) -> ProductOut:
    return ProductOut(id=product.id, name=product.name, spec=CellSpecIn.model_validate(product.spec),
                      policy=LotPolicy.model_validate(product.policy))


@router.get("/products", response_model=list[ProductOut])
def list_products(session: DbSession, _: Operator) -> list[ProductOut]:
    return [_product_out(p) for p in session.scalars(select(Product).order_by(Product.name))]


@router.put("/products/{name}", response_model=ProductOut)
def put_product(name: str, body: ProductIn, session: DbSession, who: Admin) -> ProductOut:
    if body.name != name:
        raise HTTPException(422, f"body names product {body.name!r}, the path {name!r}")
    product = session.scalar(select(Product).where(Product.name == name))
    before: dict[str, Any] | None = None if product is None else {"spec": product.spec, "policy": product.policy}
    if product is None:
        product = Product(name=name)
        session.add(product)
    product.spec, product.policy = body.spec.model_dump(), body.policy.model_dump()
    audit(session, who.name, "product_saved", name, before=before, after={"spec": product.spec, "policy": product.policy})
    session.commit()  # committed before the reply: the caller may act on it at once
    session.flush()
    return _product_out(product)


@router.get("/supplier-batches", response_model=list[BatchOut])
def list_batches(session: DbSession, _: Operator) -> list[BatchOut]:
    rows = session.execute(select(SupplierBatch, Product.name).join(Product).order_by(SupplierBatch.code)).all()
    return [BatchOut(id=b.id, code=b.code, supplier=b.supplier, product=name) for b, name in rows]


@router.post("/supplier-batches", status_code=201, response_model=BatchOut)
def create_batch(body: BatchIn, session: DbSession, who: Admin) -> BatchOut:
    product = session.scalar(select(Product).where(Product.name == body.product))
    if product is None:
        raise HTTPException(422, f"no product {body.product!r}")
    if session.scalar(select(SupplierBatch).where(SupplierBatch.code == body.code)) is not None:
        raise HTTPException(409, f"supplier batch {body.code!r} exists")
    batch = SupplierBatch(code=body.code, supplier=body.supplier, product_id=product.id)
    session.add(batch)
    audit(session, who.name, "supplier_batch_created", body.code, supplier=body.supplier, product=body.product)
    session.commit()  # committed before the reply: the caller may act on it at once
    session.flush()
    return BatchOut(id=batch.id, code=batch.code, supplier=batch.supplier, product=product.name)


@router.get("/users", response_model=list[UserOut])
def list_users(session: DbSession, _: Admin) -> list[UserOut]:
    return [UserOut(name=u.name, role=u.role, disabled=u.disabled, created_at=u.created_at)
            for u in session.scalars(select(User).order_by(User.name))]


@router.post("/users", status_code=201, response_model=UserOut)
def create_user(body: UserIn, session: DbSession, who: Admin) -> UserOut:
    if session.scalar(select(User).where(User.name == body.name)) is not None:
        raise HTTPException(409, f"user {body.name!r} exists")
    user = add_user(session, body.name, body.role, body.password, who.name)
    session.commit()
    return UserOut(name=user.name, role=user.role, disabled=user.disabled, created_at=user.created_at)


def add_user(session: DbSession, name: str, role: str, password: str, actor: str) -> User:
    """A new user (also `pouchline controller create-user`)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: use {', '.join(ROLES)}")
    user = User(name=name, role=role, password_hash=hash_password(password), created_at=utcnow())
    session.add(user)
    audit(session, actor, "user_created", name, role=role)
    session.flush()
    return user


@router.post("/tokens", status_code=201, response_model=TokenOut)
def create_token(body: TokenIn, session: DbSession, who: Admin) -> TokenOut:
    if session.scalar(select(ApiToken).where(ApiToken.name == body.name)) is not None:
        raise HTTPException(409, f"token {body.name!r} exists")
    token, digest = new_token()
    session.add(ApiToken(name=body.name, token_sha256=digest, role=body.role, scopes=body.scopes, created_at=utcnow()))
    audit(session, who.name, "token_created", body.name, role=body.role, scopes=body.scopes)
    session.commit()  # committed before the reply: the caller may act on it at once
    return TokenOut(name=body.name, role=body.role, token=token)



