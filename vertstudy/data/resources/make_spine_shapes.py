"""Rebuild ``spine_shapes.csv.gz`` from the VID ``bodies.csv`` (CC BY-SA 4.0).

Usage: ``python make_spine_shapes.py /path/to/spine-keypoints/bodies.csv [out.csv.gz]``.
The derivation rules are those of :func:`vertstudy.data.shapes.build_shape_table`; the output
is byte-for-byte reproducible (gzip mtime 0) and shared under CC BY-SA 4.0.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vertstudy.data.shapes import SHAPES_RESOURCE, build_shape_table


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    dst = Path(argv[1]) if len(argv) == 2 else Path(__file__).with_name(SHAPES_RESOURCE)
    print(build_shape_table(argv[0], dst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
