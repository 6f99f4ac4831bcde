"""The in-memory case every reader returns: an image and its vertebra centroids.

Coordinates: ``Landmark.xyz_mm`` is an ITK/LPS physical point in millimetres, in (x, y, z)
order, exactly as SimpleITK's ``TransformContinuousIndexToPhysicalPoint`` returns it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vertstudy.anatomy import INDEX, NAMES


@dataclass(frozen=True)
class Landmark:
    """One vertebra centroid: class index (0..25) and ITK/LPS physical point (x, y, z) in mm."""

    index: int
    xyz_mm: tuple[float, float, float]

    @property
    def name(self) -> str:
        return NAMES[self.index]


@dataclass
class Case:
    """A CT image with its centroids, as every reader returns it.

    Attributes:
        case_id: stable identifier (file stem or subject id).
        image: the CT in Hounsfield units, any orientation and spacing.
        landmarks: centroids of the 26 classes present, sorted by class index.
        extra_labels: counts of real vertebrae outside the 26 classes (``T13``, ``L6``,
            ``Co``), kept out of ``landmarks`` and reported, never relabelled.
        tags: conditions of the case (phantoms: ``fov``, ``metal``, ``curvature``, ``noise``,
            ``spacing``...), free-form strings.
        sources: the input files the case was read from (hashed by the cache).
        fmt: the reader that produced it (``csi2014``, ``verse``, ``generic``, ``dicom``).
    """

    case_id: str
    image: sitk.Image
    landmarks: list[Landmark]
    sources: list[Path]
    fmt: str
    extra_labels: Counter = field(default_factory=Counter)
    tags: dict[str, str] = field(default_factory=dict)

    def points_mm(self) -> np.ndarray:
        """(N, 3) float64 array of the landmarks' LPS (x, y, z) mm, in ``landmarks`` order."""
        return np.array([lm.xyz_mm for lm in self.landmarks], dtype=np.float64).reshape(-1, 3)

    def labels(self) -> list[str]:
        return [lm.name for lm in self.landmarks]


def make_landmarks(
    named_points: list[tuple[str, tuple[float, float, float]]], path: str | Path
) -> tuple[list[Landmark], Counter]:
    """Split canonical-name points into class landmarks and counted extra labels.

    Raises ``InputError`` naming ``path`` on a duplicate label.
    """
    from vertstudy.errors import InputError

    seen: set[str] = set()
    landmarks: list[Landmark] = []
    extra: Counter = Counter()
    for name, xyz in named_points:
        if name in seen:
            raise InputError(path, f"duplicate label {name!r}: each vertebra may appear once")
        seen.add(name)
        if name in INDEX:
            landmarks.append(Landmark(INDEX[name], tuple(float(v) for v in xyz)))
        else:
            extra[name] += 1
    landmarks.sort(key=lambda lm: lm.index)
    return landmarks, extra
