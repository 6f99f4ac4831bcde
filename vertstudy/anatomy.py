"""The 26 vertebra classes, their regions and the label vocabularies of the data sets.

Classes (index: name): 0-6 C1-C7, 7-18 T1-T12, 19-23 L1-L5, 24-25 S1-S2.
Transitional vertebrae (L6, T13) and the coccyx are *not* classes: readers count them
(``Case.extra_labels``) and report them, never relabel them.
"""

from __future__ import annotations

import re

NAMES: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "S1",
    "S2",
)
NUM_CLASSES = len(NAMES)  # 26
INDEX: dict[str, int] = {name: i for i, name in enumerate(NAMES)}

REGIONS: dict[str, range] = {
    "cervical": range(0, 7),
    "thoracic": range(7, 19),
    "lumbar": range(19, 24),
    "sacral": range(24, 26),
}

# Real vertebrae outside the 26 classes: counted and reported, never relabelled.
EXTRA_NAMES: tuple[str, ...] = ("T13", "L6", "Co")

# VerSe integer labels: 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, 26 sacrum (-> S1),
# 27 coccyx, 28 T13.
VERSE_TO_NAME: dict[int, str] = {
    **{i: NAMES[i - 1] for i in range(1, 25)},
    25: "L6",
    26: "S1",
    27: "Co",
    28: "T13",
}

_NAME_RE = re.compile(r"^\s*(C|T|L|S|Co)(\d*)(?:[_\- ].*)?\s*$", re.IGNORECASE)


def region_of(index: int) -> str:
    """Region name ('cervical', 'thoracic', 'lumbar', 'sacral') of class ``index`` (0..25)."""
    for region, members in REGIONS.items():
        if index in members:
            return region
    raise ValueError(f"class index must be in 0..{NUM_CLASSES - 1}, got {index}")


def parse_name(raw: str) -> str | None:
    """Normalise a landmark name such as ``'T12'``, ``'t12_center'`` or ``'L5 centroid'``.

    Returns the canonical name (one of ``NAMES`` or ``EXTRA_NAMES``), or ``None`` when the
    name is not a vertebra this project knows.
    """
    m = _NAME_RE.match(raw)
    if not m:
        return None
    letter, number = m.group(1), m.group(2)
    if letter.lower() == "co":
        return "Co" if number in ("", "1") else None
    name = f"{letter.upper()}{number}"
    if name in INDEX or name in EXTRA_NAMES:
        return name
    return None


def parse_verse_label(value: int) -> str | None:
    """Canonical name of a VerSe integer label, or ``None`` when the label is unknown."""
    return VERSE_TO_NAME.get(int(value))
