"""Architectures: what the workers can run, as they last reported it (the API itself imports no torch)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobstore.models import WorkerCatalog

from .. import schemas
from ..deps import SessionDep, TenantDep
from ..errors import problems

router = APIRouter(prefix="/v1/architectures", tags=["architectures"])


def _merged(session: Session) -> tuple[dict[str, dict], WorkerCatalog | None]:
    """Every reported architecture once; its weights count as present when any worker has them."""
    rows = session.scalars(select(WorkerCatalog).order_by(WorkerCatalog.reported_at)).all()
    merged: dict[str, dict] = {}
    for row in rows:
        for arch in row.catalog.get("architectures", []):
            seen = merged.setdefault(arch["name"], dict(arch))
            if arch.get("pretrained_available"):
                seen["pretrained_available"] = True
    return merged, (rows[-1] if rows else None)


def pretrained_reported_missing(session: Session, architecture: str) -> bool:
    """True when workers have reported and none has ImageNet weights for ``architecture``.

    Without any report the API cannot tell; the job then fails at the worker if they are missing.
    """
    merged, latest = _merged(session)
    if latest is None:
        return False
    return not (merged.get(architecture) or {}).get("pretrained_available")


@router.get("", response_model=schemas.ArchitectureList, summary="List the architectures workers can run",
            responses=problems(401))
def list_architectures(session: SessionDep, _tenant: TenantDep) -> schemas.ArchitectureList:
    """small_cnn, torchvision's classification CNNs and the timm CNNs whose weights the workers have
    cached, with the default input size, the saliency target layer there and whether ImageNet
    weights are present (for `model.pretrained`), as the workers last reported at their start."""
    merged, latest = _merged(session)
    return schemas.ArchitectureList(
        data=[schemas.ArchitectureInfo.model_validate(a) for a in merged.values()],
        timm="Any timm CNN as timm/<name> (timm.list_models()); vision transformers are refused.",
        reported_at=latest.reported_at if latest else None,
        versions=latest.catalog.get("versions", {}) if latest else {},
    )
