"""The ``vertstudy`` command line: a thin layer over plain functions.

Every user error (:class:`~vertstudy.errors.VertstudyError`) becomes one line on stderr and
exit code 2; Ctrl-C exits 130. Nothing below this module reads argv or the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vertstudy import __version__
from vertstudy.errors import VertstudyError

FORMATS_IN = ("auto", "csi2014", "verse", "generic")


def _number(convert, lowest: float, inclusive: bool, what: str):
    """An argparse type: ``convert`` the text and require it >= (or >) ``lowest``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < lowest or (not inclusive and value == lowest):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _number(int, 1, True, "a whole number >= 1")
_nonneg_int = _number(int, 0, True, "a whole number >= 0")
_positive_float = _number(float, 0.0, False, "a number > 0")


# -- data ----------------------------------------------------------------------------------
def cmd_data_phantom(args: argparse.Namespace) -> int:
    from vertstudy.data.phantom import PhantomConfig, write_phantoms

    config = PhantomConfig.preset(args.resolution)
    paths = write_phantoms(
        Path(args.out), cases=args.cases, seed=args.seed, fmt=args.format, config=config,
        workers=args.workers, progress=not args.quiet,
    )
    print(f"wrote {args.cases} phantom cases ({args.format}, {args.resolution}) to {args.out} ({len(paths)} files)")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vertstudy.config import PrepConfig, validated
    from vertstudy.data.prepare import prepare_dataset, summary_rows

    prep = validated(PrepConfig, "--spacing-mm", spacing_mm=args.spacing_mm)
    result = prepare_dataset(
        Path(args.root), Path(args.cache), fmt=args.format, prep=prep, workers=args.workers,
        strict=args.strict, progress=not args.quiet,
    )
    console = Console()
    table = Table(title=f"prepared {args.root}", show_header=False)
    for label, value in summary_rows(result):
        table.add_row(label, value)
    console.print(table)
    for case_id, why in result.skipped:  # plain print: one unwrapped line per case, easy to grep
        print(f"skipped {case_id}: {why}")
    if not result.cases:
        print(f"error: no case under {args.root} could be prepared", file=sys.stderr)
        return 2
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from vertstudy.config import PrepConfig, validated
    from vertstudy.data.show import show_case

    out = show_case(
        Path(args.case), Path(args.out), landmarks=Path(args.landmarks) if args.landmarks else None,
        prep=validated(PrepConfig, "--spacing-mm", spacing_mm=args.spacing_mm),
    )
    print(f"wrote {out}")
    return 0


# -- bench ---------------------------------------------------------------------------------
def cmd_bench_prep(args: argparse.Namespace) -> int:
    from vertstudy.bench.prep import bench_prep, format_table

    figures = bench_prep(
        cases=args.cases, size_xyz=tuple(args.size), spacing_xyz=tuple(args.spacing), seed=args.seed,
        workdir=Path(args.workdir) if args.workdir else None, progress=not args.json,
    )
    print(json.dumps(figures) if args.json else format_table(figures))
    return 0


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vertstudy",
        description="Hyperparameter and ablation studies of the residual multi-label vertebra labeling network.",
    )
    parser.add_argument("--version", action="version", version=f"vertstudy {__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = top.add_parser("data", help="make phantoms, preprocess data sets, look at cases",
                          description="Data commands: phantom generation, preprocessing into the cache, case views.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = data_sub.add_parser("phantom", help="write synthetic spine CTs with exactly known centroids",
                            description="Write N synthetic spine CT cases (deterministic for a seed) in the CSI 2014 "
                                        "or VerSe format, with their condition tags.")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cases", type=_positive_int, required=True, help="number of cases")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--format", choices=("csi2014", "verse"), default="csi2014", help="file format (default csi2014)")
    p.add_argument("--resolution", choices=("clinical", "coarse"), default="clinical",
                   help="clinical: 0.6-1.0 mm in-plane, 1-3 mm slices; coarse: fast, for tests and CPU studies")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_phantom)

    p = data_sub.add_parser("prepare", help="preprocess a data set into the content-addressed cache",
                            description="Reorient, resample to isotropic spacing, clamp HU and z-score every case "
                                        "under ROOT into the cache; cached cases are not redone. Bad cases are "
                                        "reported and skipped unless --strict.")
    p.add_argument("--root", required=True, help="data set folder")
    p.add_argument("--format", choices=FORMATS_IN, default="auto", help="data set format (default auto)")
    p.add_argument("--cache", required=True, help="cache folder (created)")
    p.add_argument("--spacing-mm", type=_positive_float, default=2.0, help="isotropic spacing in mm (default 2.0)")
    p.add_argument("--workers", type=_positive_int, default=2, help="parallel processes (default 2)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad case (finished cases are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)

    p = data_sub.add_parser("show", help="sagittal and coronal views of a case with its centroids",
                            description="Render sagittal and coronal views of CASE (an image file, a DICOM folder or "
                                        "a cache entry folder) with each centroid marked and labelled.")
    p.add_argument("case", metavar="CASE", help="image file, DICOM series folder or cache entry folder")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--landmarks", help="centroid file (JSON/CSV in LPS mm, .lml, VerSe ctd) if not found beside CASE")
    p.add_argument("--spacing-mm", type=_positive_float, default=2.0, help="display resampling spacing (default 2.0)")
    p.set_defaults(func=cmd_data_show)

    bench = top.add_parser("bench", help="measure the figures the issues ask for",
                           description="Benchmarks: each prints a table, or one JSON object with --json.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    p = bench_sub.add_parser("prep", help="preprocessing throughput on 1 and 2 processes, and a cached rerun",
                             description="Write realistic-size phantoms, preprocess them on one and on two processes "
                                         "into fresh caches, then rerun on a warm cache; report cases/s and ratios.")
    p.add_argument("--cases", type=_positive_int, default=4, help="phantom cases (default 4)")
    p.add_argument("--size", type=_positive_int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"),
                   help="image size in voxels (default 512 512 300)")
    p.add_argument("--spacing", type=_positive_float, nargs=3, default=(0.8, 0.8, 1.5), metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm (default 0.8 0.8 1.5)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="phantom seed (default 0)")
    p.add_argument("--workdir", help="folder for the phantoms and caches (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    p.set_defaults(func=cmd_bench_prep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VertstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
