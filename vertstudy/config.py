"""The one typed configuration of vertstudy, validated once where it enters.

Every tunable value is a field here; a study (YAML) or a Ray trial config (dict with dotted
names) is turned into a :class:`Config` by :func:`load_config`, and everything below takes
the typed parts it needs. Units: millimetres, voxels, Hounsfield units, as named.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vertstudy.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepConfig(_Strict):
    """Preprocessing (paper III-A): canonical orientation, isotropic resampling, HU clamp, z-score."""

    spacing_mm: float = Field(2.0, gt=0, le=10, description="isotropic output spacing, mm")
    hu_min: float = Field(-1000.0, description="HU below this (air) are clamped to it")
    antialias: bool = Field(True, description="Gaussian pre-smoothing when downsampling")


class AugmentConfig(_Strict):
    """Light augmentation of training crops; targets move with the image."""

    enabled: bool = True
    rotate_deg: float = Field(8.0, ge=0, le=45, description="max rotation about each axis, degrees")
    scale: float = Field(0.08, ge=0, lt=0.5, description="max relative isotropic scaling")
    intensity_scale: float = Field(0.1, ge=0, lt=1, description="max relative intensity scaling")
    intensity_shift: float = Field(0.1, ge=0, lt=2, description="max intensity shift, z-score units")


class CropConfig(_Strict):
    """Random crops along the spine (paper Fig. 7)."""

    crop_size: tuple[int, int, int] = Field((104, 80, 80), description="(z, y, x) voxels at spacing_mm")
    jitter_mm: float = Field(40.0, ge=0, description="random offset of the crop centre from the spine, mm")
    crops_per_case: int = Field(4, ge=1, description="training crops drawn per case per epoch")

    @field_validator("crop_size")
    @classmethod
    def _positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(s < 8 for s in v):
            raise ValueError(f"every crop axis must be >= 8 voxels, got {v}")
        return v


class DataConfig(_Strict):
    prep: PrepConfig = PrepConfig()
    crop: CropConfig = CropConfig()
    augment: AugmentConfig = AugmentConfig()


class Config(_Strict):
    """Top-level configuration: one field per pipeline stage."""

    data: DataConfig = DataConfig()
    seed: int = 0


def load_config(values: dict[str, Any] | None = None, where: str = "config") -> Config:
    """Build a validated :class:`Config` from nested or dotted-name values.

    ``{"data.prep.spacing_mm": 3}`` and ``{"data": {"prep": {"spacing_mm": 3}}}`` are the same.
    Raises ``ConfigError`` naming ``where``, the field, the bad value and what is accepted.
    """
    nested: dict[str, Any] = {}
    for key, value in (values or {}).items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: field {key!r} conflicts with a value set for {part!r}")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return validated(Config, where, **nested)


def validated(model: type[BaseModel], where: str, **values: Any) -> Any:
    """``model(**values)``, with a validation failure turned into a one-line ``ConfigError``
    naming ``where``, the field, the bad value and what is accepted."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        bad = err.get("input")
        raise ConfigError(f"{where}: field {field!r} = {bad!r}: {err['msg']}") from None
