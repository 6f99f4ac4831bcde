"""The ``vertstudy`` command line: a thin layer over plain functions.

Every user error (:class:`~vertstudy.errors.VertstudyError`) becomes one line on stderr and
exit code 2; Ctrl-C exits 130. Nothing below this module reads argv or the environment.

Each command group has its handlers and an ``_add_<group>_command(s)`` function that adds its
parser; :func:`build_parser` calls them in order. Benchmarks are the records of :data:`BENCHMARKS`,
all run by :func:`cmd_bench`.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vertstudy import __version__
from vertstudy.errors import ConfigError, VertstudyError

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
_nonneg_float = _number(float, 0.0, True, "a number >= 0")


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
        strict=args.strict, progress=not args.quiet, for_prediction=args.for_prediction,
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


def _add_data_commands(top: argparse._SubParsersAction) -> None:
    """``vertstudy data phantom|prepare|show``."""
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
    p.add_argument("--for-prediction", action="store_true",
                   help="CTs to label: prepare cases without landmarks (a training set refuses them as bad cases)")
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


# -- predict -------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    from vertstudy.infer.predict import format_summary, predict

    summary = predict(
        Path(args.image), Path(args.checkpoint), Path(args.out), png=Path(args.png) if args.png else None,
        fmt=args.format, truth=Path(args.truth) if args.truth else None, device=args.device,
    )
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import tempfile

    from vertstudy.infer.diagnose import diagnose_checkpoint, format_decomposition, format_sweep

    sweep = _sweep_grid(args.sweep) if args.sweep else None
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="vertstudy-diagnose-"))
    try:
        figures = diagnose_checkpoint(Path(args.checkpoint), Path(args.data), cache, fmt=args.format,
                                      device=args.device, near_mm=args.near_mm, progress=not args.json, sweep=sweep)
    finally:
        if not args.cache:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{figures['checkpoint']}: {figures['cases']} cases, {figures['vertebrae']} vertebrae\n")
        print(format_sweep(figures["sweep"]) if sweep is not None else format_decomposition(figures))
    return 0


def _sweep_grid(items: list[str]) -> dict[str, list]:
    """``["infer.kmeans_threshold=0.5,0.9", "infer.decoder=kmeans"]`` -> ``{field: [values]}``,
    each value YAML-parsed (``null`` is None); a field given twice is refused."""
    import yaml

    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--sweep {item!r}: expected FIELD=V1,V2,..., e.g. --sweep "
                              "infer.kmeans_threshold=0.5,0.9")
        if key in grid:
            raise ConfigError(f"--sweep {key}: given twice; list all its values once, separated by commas")
        try:
            grid[key] = [yaml.safe_load(v.strip()) for v in values.split(",")]
        except yaml.YAMLError:
            raise ConfigError(f"--sweep {item!r}: a value is not valid YAML") from None
    return grid


def _add_predict_command(top: argparse._SubParsersAction) -> None:
    """``vertstudy predict``."""
    p = top.add_parser("predict", help="label the vertebrae of one CT with a trained checkpoint",
                       description="Tile the CT with overlapping crops, decode the votes (infer.decoder of the "
                                   "checkpoint: the sequence decoder or the paper's per-class K-means) "
                                   "and write the centroids in the image's own space: VerSe ctd JSON or a 3D "
                                   "Slicer markups file, and optionally a sagittal/coronal picture.")
    p.add_argument("image", metavar="IMAGE_OR_DICOM_DIR", help="image file (NIfTI, NRRD, MHA) or DICOM series folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by the trainer (best.pt or last.pt)")
    p.add_argument("--out", required=True, help="output JSON (*_ctd.json for verse, *.mrk.json for slicer)")
    p.add_argument("--png", help="also draw sagittal and coronal views with the centroids")
    p.add_argument("--format", choices=("verse", "slicer"), default="verse", help="output format (default verse)")
    p.add_argument("--truth", help="landmark file of the same image: drawn in blue, errors in the summary")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default auto)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_predict)


def _add_diagnose_command(top: argparse._SubParsersAction) -> None:
    """``vertstudy diagnose``."""
    p = top.add_parser("diagnose", help="where a checkpoint loses identification on CTs with known centroids",
                       description="Label every case of DATA (CTs with landmark files) four ways - every tile or "
                                   "only tiles near the true spine, the classifier or the true classes - with "
                                   "each decoder, plus crop-level recall, false positives and localization "
                                   "error on spine-centred crops: which stage loses identification.")
    p.add_argument("checkpoint", help="checkpoint written by the trainer (best.pt or last.pt)")
    p.add_argument("data", help="folder of CTs with landmark files (any format data prepare reads)")
    p.add_argument("--format", choices=FORMATS_IN, default="auto", help="data set format (default auto)")
    p.add_argument("--cache", help="cache folder for the prepared cases (default: temporary, removed)")
    p.add_argument("--near-mm", type=_positive_float, default=40.0,
                   help="a tile is near the spine when its centre is this close to it (default 40)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (default auto)")
    p.add_argument("--sweep", action="append", metavar="FIELD=V1,V2,...",
                   help="instead of the decomposition, label the cases with every combination of these inference "
                        "fields (decoder, threshold, min_votes, centre_weight, kmeans_threshold, "
                        "kmeans_centre_weight, seq_*; the network runs once per case) and rank them by id rate; "
                        "repeatable, e.g. --sweep infer.kmeans_threshold=0.5,0.7,0.9 --sweep "
                        "infer.kmeans_centre_weight=0,1,8. Sweep on training or validation CTs, not on the cases "
                        "you report")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=cmd_diagnose)


# -- study -------------------------------------------------------------------------------
def _print_table(title: str, rows: list[dict], columns: dict[str, str]) -> None:
    """``columns``: row key -> heading. Missing values print as ``-``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for heading in columns.values():
        table.add_column(heading, no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row[c]) if c in row else "-" for c in columns))
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return "" if value is None else str(value)


def _print_result(result) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items())) or "no trial ended"
    print(f"study directory: {result.study_dir}")
    print(f"trials: {counts}; wall time {result.wall_s:.0f} s" + (" (interrupted)" if result.interrupted else ""))
    _print_search(result)
    best, base = result.best, result.baseline
    if best:
        metric = best.get("search_metric") or ""
        by = f" (by {metric} = {_cell(best.get(f'best_{metric}'))})" if metric else ""
        print(f"best trial {best['trial_id']}{by}: validation crops {_cell(best.get('best_val_loc_error_mm'))} mm, "
              f"id rate {_cell(best.get('best_val_id_rate'))}; held-out whole CTs "
              f"{_cell(best.get('test_loc_error_mm_mean'))} mm, id rate {_cell(best.get('test_id_rate'))}")
    if base:
        print(f"mean-position baseline on the held-out CTs: {_cell(base.get('loc_error_mm_mean'))} mm, "
              f"id rate {_cell(base.get('id_rate'))}")
    if result.freed_bytes:
        print(f"checkpoints: the resume state (last.pt) of the trials that ended for good deleted, "
              f"{result.freed_bytes / 1e6:.1f} MB; their best.pt stays")
    if result.interrupted:
        print(f"continue with: vertstudy study resume {result.study_dir}")
    elif result.counts.get("error"):
        print(f"{result.counts['error']} trial(s) ended in error after their retries (see the message column); "
              f"`vertstudy study resume {result.study_dir}` retries them from their last checkpoint "
              "(after a full disk, free space first)")


def _print_search(result) -> None:
    """A search's trials in the order they were sampled, what ASHA stopped and the parameter
    importances (:mod:`vertstudy.report.summary`); nothing for a grid."""
    from vertstudy.report.summary import search_lines, search_rows, table_lines
    from vertstudy.study.runner import load_study_dir

    spec, _ = load_study_dir(result.study_dir)
    if spec.search.is_grid:
        return
    lines = table_lines(search_rows(spec, result.study_dir))
    for line in ["trials, in the order they were sampled:", *lines] if lines else []:
        print(line)
    for line in search_lines(spec, result.study_dir):
        print(line)


def _exit_code(result) -> int:
    return 130 if result.interrupted else 0


def _study_spec(path: str, args: argparse.Namespace):
    """The study file at ``path`` with the command line's overrides and ``--scale``, validated."""
    from vertstudy.study.spec import SCALES, load_study, validate_spec

    spec = load_study(path)
    overrides = {}
    if args.storage:
        overrides["storage"] = args.storage
    if args.wandb:
        overrides["wandb"] = {"mode": args.wandb}
    optuna_url = args.optuna_storage or os.environ.get("VERTSTUDY_OPTUNA_STORAGE")
    if optuna_url:
        overrides["search"] = {**spec.search.model_dump(), "optuna_storage": optuna_url}
    if overrides:
        spec = validate_spec({**spec.model_dump(), **overrides}, f"{path} (with command-line options)")
    if args.scale:
        spec = SCALES[args.scale](spec)
        spec = validate_spec(spec.model_dump(mode="json"), f"{path} (--scale {args.scale})")
    return spec


def cmd_study_run(args: argparse.Namespace) -> int:
    from vertstudy.study.runner import run_study

    if args.smoke:
        if args.scale not in (None, "smoke"):
            raise ConfigError(f"--smoke is --scale smoke; give one of them, not --smoke with --scale {args.scale}")
        args.scale = "smoke"
    if len(args.study) > 1:
        return _run_several(args)
    result = run_study(_study_spec(args.study[0], args), address=_address(args), progress=not args.no_progress)
    _print_result(result)
    return _exit_code(result)


def _run_several(args: argparse.Namespace) -> int:
    """``study run A.yaml B.yaml ...``: each configuration trained once, each study run, resumed or skipped
    (:mod:`vertstudy.study.plan`); then the report command of the studies that hold trials."""
    import datetime as dt

    from vertstudy.study.plan import plan_studies, run_planned

    plans = plan_studies([_study_spec(path, args) for path in args.study])
    print("plan (a configuration several files ask for is trained once; the report pools trials by configuration):")
    for p in plans:
        print(f"  {p.describe()}")
    outcomes = run_planned(plans, address=_address(args), progress=not args.no_progress, say=print)
    for o in outcomes:
        if o.result is not None:
            _print_result(o.result)
    if any(o.result is not None and o.result.interrupted for o in outcomes):
        print("continue with the same command: finished studies are skipped, the interrupted one is resumed")
        return 130
    dirs = [o.study_dir for o in outcomes if o.study_dir]
    if dirs:
        name = "phantoms-cpu" if args.scale == "cpu" else "-".join(o.name for o in outcomes if o.study_dir)
        today = dt.datetime.now(dt.timezone.utc).date().isoformat()
        print(f"report: vertstudy report {' '.join(dirs)} --out reports/{name}-{today}")
    return 0


def _address(args: argparse.Namespace) -> str | None:
    """--address, else RAY_ADDRESS (set by `ray job submit` and by the local cluster's env.sh)."""
    return args.address or os.environ.get("RAY_ADDRESS") or None


def cmd_study_resume(args: argparse.Namespace) -> int:
    from vertstudy.study.runner import resume_study

    result = resume_study(args.dir, address=_address(args), progress=not args.no_progress)
    _print_result(result)
    return _exit_code(result)


def cmd_study_status(args: argparse.Namespace) -> int:
    from vertstudy.study.runner import study_status
    from vertstudy.study.schema import STATUS_HEADINGS

    spec, rows, baseline = study_status(args.dir)
    if args.json:
        print(json.dumps({"study": spec.name, "trials": rows, "baseline": baseline}, default=str))
        return 0
    params = {p: p.split(".")[-1] for p in spec.space}
    _print_table(f"study {spec.name}: {len(rows)} trials", rows, {**STATUS_HEADINGS, **params})
    if baseline:
        print(f"mean-position baseline on the held-out CTs: {_cell(baseline.get('loc_error_mm_mean'))} mm, "
              f"id rate {_cell(baseline.get('id_rate'))}")
    return 0


def cmd_study_export(args: argparse.Namespace) -> int:
    from vertstudy.study.runner import export_tables

    outcomes = export_tables(args.dir)
    print(f"wrote trials.parquet, epochs.parquet, vertebrae.parquet for {len(outcomes)} ended trials in {args.dir}")
    return 0


NO_LEASE_HELP = ("run without the driver lease (VERTSTUDY_NO_LEASE=1), where the storage has none (gs://, a store "
                 "without conditional writes): you make sure no other driver of the study runs")


def _add_study_commands(top: argparse._SubParsersAction) -> None:
    """``vertstudy study run|resume|status|export``."""
    study = top.add_parser("study", help="run, resume, inspect and export hyperparameter studies on Ray",
                           description="Hyperparameter and ablation studies: Ray Tune + Optuna + W&B + Parquet.")
    study_sub = study.add_subparsers(dest="study_command", required=True, metavar="COMMAND")
    p = study_sub.add_parser("run", help="run study files on a Ray cluster (or a local one)",
                             description="Run STUDY.yaml: trials on Ray, Optuna search, W&B runs, Parquet tables. "
                                         "With several files, in order on one cluster: a configuration that an "
                                         "earlier file's grid already trains (same data, config and seeds) is "
                                         "not trained again (the report pools trials by configuration), a "
                                         "study whose trials have all ended is skipped and an interrupted one "
                                         "resumed, so the same command continues a cut-off run.")
    p.add_argument("study", nargs="+", help="the study file(s) (studies/*.yaml)")
    p.add_argument("--address", help="Ray cluster address (default: start a local cluster, or RAY_ADDRESS)")
    p.add_argument("--storage", help="results directory or URI (overrides the study's storage)")
    p.add_argument("--wandb", choices=("offline", "online", "disabled"),
                   help="W&B mode (overrides the study's; online reads WANDB_API_KEY from the environment)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="Optuna storage: a database URL without password (postgresql://user@host/db; the password "
                        "comes from PGPASSWORD) or journal:<shared path>; default VERTSTUDY_OPTUNA_STORAGE, else "
                        "SQLite in the study directory")
    p.add_argument("--scale", choices=("smoke", "cpu"),
                   help="size the study for a CPU machine: smoke (tiny data, network and epochs: about a minute) or "
                        "cpu (the ablation grids on 60 shared coarse phantoms, 20 held out, 3 seeds, a width-0.25 "
                        "network for 45 epochs: studies/table*.yaml in about an hour on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="the same as --scale smoke")
    p.add_argument("--no-progress", action="store_true", help="no live trials table")
    p.add_argument("--no-lease", action="store_true", help=NO_LEASE_HELP)
    p.set_defaults(func=cmd_study_run)

    p = study_sub.add_parser("resume", help="continue an interrupted study from its directory",
                             description="Ended trials are kept, running ones continue from their checkpoints.")
    p.add_argument("dir", help="the study directory (<storage>/<study name>)")
    p.add_argument("--address", help="Ray cluster address (default: start a local cluster, or RAY_ADDRESS)")
    p.add_argument("--no-progress", action="store_true", help="no live trials table")
    p.add_argument("--no-lease", action="store_true", help=NO_LEASE_HELP)
    p.set_defaults(func=cmd_study_resume)

    p = study_sub.add_parser("status", help="print the trials table of a study",
                             description="Ended trials from trials.parquet, then pending and running ones.")
    p.add_argument("dir", help="the study directory (<storage>/<study name>)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_study_status)

    p = study_sub.add_parser("export", help="rebuild the Parquet tables from Ray's results",
                             description="Rebuild trials/epochs/vertebrae.parquet from the study's Ray results.")
    p.add_argument("dir", help="the study directory (<storage>/<study name>)")
    p.set_defaults(func=cmd_study_export)


# -- report --------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from vertstudy.report import build_report

    built = build_report(args.dirs, args.out, date=args.date, chosen=args.chosen, progress=not args.quiet)
    for path in built.files:
        print(f"wrote {path}")
    print(f"with {built.figures} figures in {built.out / 'figures'}; {built.bytes / 1e6:.2f} MB in all; "
          f"built in {built.seconds:.1f} s")
    if args.wandb is not False:
        from vertstudy.report.build import track_report

        settings, run = track_report(args.dirs, built, mode=args.wandb)
        where = f" in {settings.dir / 'wandb'}" if settings.dir is not None else ""
        if args.wandb == "disabled":
            print("W&B: nothing logged (--wandb disabled)")
        elif settings.mode == "disabled":
            print(f"W&B: nothing logged (the study {args.dirs[0]} has wandb.mode disabled; give --wandb offline or "
                  "online)")
        elif run is not None:
            print(f"W&B: report run {run} ({settings.mode}{where}; job type report, artifact type report)")
    return 0


def _add_report_command(top: argparse._SubParsersAction) -> None:
    """``vertstudy report``."""
    p = top.add_parser("report", help="turn studies into a report: Tables I-V, search, robustness, failures, cost",
                       description="Build a report from the Parquet tables of one or more study directories "
                                   "(finished or still running): report.md with PNG figures, a self-contained "
                                   "report.html, tables.tex (booktabs) and report.json. The same tables and "
                                   "--date give the same files.")
    p.add_argument("dirs", nargs="+", metavar="STUDY_DIR",
                   help="study directory <storage>/<name> (or a pyarrow URI); Tables I-V pool every study given")
    p.add_argument("--out", required=True,
                   help="report folder, e.g. reports/NAME (an earlier report there is replaced once the new one is "
                        "complete)")
    p.add_argument("--date", help="date in the report's header, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--chosen", metavar="TRIAL_ID",
                   help="Table IV, robustness and the failure gallery use this trial's configuration (default: the "
                        "configuration with the best mean validation identification rate)")
    p.add_argument("--wandb", nargs="?", choices=("offline", "online", "disabled"), const=None, default=False,
                   metavar="MODE",
                   help="also log the report to W&B: a new run of job type report in the first study's group, with "
                        "the report's files (HTML, JSON, figures) as an artifact of type report; MODE offline, "
                        "online or disabled (default: the first study's wandb.mode, offline unless it says "
                        "otherwise; online reads WANDB_API_KEY from the environment)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_report)


# -- cluster -------------------------------------------------------------------------------
def cmd_cluster_start(args: argparse.Namespace) -> int:
    from vertstudy.localcluster import start_local_cluster

    c = start_local_cluster(Path(args.dir), workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                            head_cpus=args.head_cpus, object_store_mb=args.object_store_mb,
                            log=lambda m: print(m, file=sys.stderr), netns=args.netns,
                            health_check_s=args.health_check_s, home_per_node=args.home_per_node)
    print(f"local Ray cluster up: head + {len(c.workers())} workers, token authentication on"
          + (f"; workers in network namespaces ({', '.join(n.ip for n in c.workers())})" if c.network else ""))
    print(f"  address:   {c.address}   (vertstudy study run --address, ray.init)")
    print(f"  jobs:      {c.dashboard_url}   (ray job submit --address; dashboard on localhost only)")
    print(f"  for a shell: source {c.root / 'env.sh'}")
    print(f"  stop with: vertstudy cluster stop --dir {c.root}")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from vertstudy.localcluster import load_cluster

    c = load_cluster(Path(args.dir))
    if args.json:
        print(json.dumps({"address": c.address, "dashboard": c.dashboard_url, "running": c.running(),
                          "nodes": [vars(n) for n in c.nodes]}))
        return 0
    print(f"{c.root}: {'running' if c.running() else 'not running'}; address {c.address}, jobs {c.dashboard_url}")
    for n in c.nodes:
        role = "head" if n.index == 0 else f"worker {n.index}"
        state = "killed" if not n.alive else "cut off" if n.cut else "alive"
        print(f"  {role:<9} {n.cpus:g} CPU  {n.ip:<15} node {n.node_id}  raylet pid {n.raylet_pid}  {state}")
    return 0


def cmd_cluster_kill_worker(args: argparse.Namespace) -> int:
    from vertstudy.localcluster import kill_worker

    pids = kill_worker(Path(args.dir), args.index)
    print(f"worker {args.index}: SIGKILLed {len(pids)} processes (raylet and what it started)")
    return 0


def cmd_cluster_cut_worker(args: argparse.Namespace) -> int:
    from vertstudy.localcluster import cut_worker

    cut_worker(Path(args.dir), args.index, heal=args.heal)
    print(f"worker {args.index}: network link {'up again' if args.heal else 'down (its processes keep running)'}")
    return 0


def cmd_cluster_stop(args: argparse.Namespace) -> int:
    from vertstudy.localcluster import stop_local_cluster

    stop_local_cluster(Path(args.dir))
    return 0


def _add_cluster_commands(top: argparse._SubParsersAction) -> None:
    """``vertstudy cluster start|status|kill-worker|cut-worker|stop``."""
    cluster = top.add_parser("cluster", help="a multi-node Ray cluster on this machine (development and tests)",
                             description="Start, inspect, break and stop a local multi-node Ray cluster: a head and "
                                         "N worker nodes, each its own raylet with its own CPUs, token auth on.")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    dir_help = "cluster directory: token, state, Ray's session (short path, e.g. /tmp/vs-cluster)"
    p = cluster_sub.add_parser("start", help="start a head and N worker nodes", description="Start a head and N "
                               "worker nodes on this machine; prints the address and the env file for drivers.")
    p.add_argument("--dir", required=True, help=dir_help)
    p.add_argument("--workers", type=_nonneg_int, default=2, help="worker nodes (default 2)")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=1.0, help="CPUs of each worker (default 1)")
    p.add_argument("--head-cpus", type=_nonneg_float, default=0.0,
                   help="CPUs of the head (default 0: trials run on workers only)")
    p.add_argument("--object-store-mb", type=_positive_int, default=100,
                   help="object store of each node in MB (default 100; Ray would take 30%% of RAM per node)")
    p.add_argument("--netns", action="store_true",
                   help="run each worker in a network namespace of its own, with its own IP address on a private "
                        "bridge, as separate hosts (needs root and iproute2; lets cut-worker partition a node)")
    p.add_argument("--health-check-s", type=_nonneg_float, default=0.0,
                   help="seconds without an answer after which the head declares a node dead (default 0: Ray's, "
                        "about 30 s)")
    p.add_argument("--home-per-node", action="store_true",
                   help="give each node a HOME of its own (<dir>/home/node-N), so nodes share no cache or working "
                        "folder, as separate hosts (test object storage: data and checkpoints reach a node only "
                        "through the store)")
    p.set_defaults(func=cmd_cluster_start)
    p = cluster_sub.add_parser("status", help="the nodes of a local cluster", description="Print the nodes of the "
                               "local cluster in --dir: role, CPUs, Ray node id, raylet pid, alive or killed.")
    p.add_argument("--dir", required=True, help=dir_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cluster_status)
    p = cluster_sub.add_parser("kill-worker", help="SIGKILL one worker node (fault drills)",
                               description="SIGKILL worker node INDEX: its raylet and every process it started.")
    p.add_argument("--dir", required=True, help=dir_help)
    p.add_argument("index", type=_positive_int, help="worker index (1..N)")
    p.set_defaults(func=cmd_cluster_kill_worker)
    p = cluster_sub.add_parser("cut-worker", help="take one worker's network link down (fault drills; --netns)",
                               description="Take worker INDEX's network link down: a partition, not a kill - its "
                                           "processes keep running. --heal brings the link up again. Only for a "
                                           "cluster started with --netns.")
    p.add_argument("--dir", required=True, help=dir_help)
    p.add_argument("index", type=_positive_int, help="worker index (1..N)")
    p.add_argument("--heal", action="store_true", help="bring the link up again")
    p.set_defaults(func=cmd_cluster_cut_worker)
    p = cluster_sub.add_parser("stop", help="stop every process of a local cluster",
                               description="Stop the local cluster in --dir (only its processes).")
    p.add_argument("--dir", required=True, help=dir_help)
    p.set_defaults(func=cmd_cluster_stop)


# -- bench ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Bench:
    """One ``vertstudy bench NAME``: its help, its own options, how to run it and how to print its figures.

    Every benchmark also gets ``--workdir`` and ``--json`` (and ``--seed`` when ``seed_help`` is given),
    added after its own options; :func:`cmd_bench` runs them all the same way.
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Path | None, bool], dict]  # (args, workdir, progress) -> figures
    format_table: Callable[[dict], str]
    workdir_help: str
    seed_help: str | None = None


def _format_table_of(module: str) -> Callable[[dict], str]:
    """``vertstudy.bench.<module>.format_table``, imported only when a table is printed."""

    def format_table(figures: dict) -> str:
        return importlib.import_module(f"vertstudy.bench.{module}").format_table(figures)

    return format_table


def cmd_bench(bench: _Bench, args: argparse.Namespace) -> int:
    """Run one benchmark; print its figures as one JSON object (--json) or as its readable table.
    Exit status 1 when a benchmark reports sections that failed (``failed_sections``)."""
    workdir = Path(args.workdir) if args.workdir else None
    figures = bench.run(args, workdir, not args.json)
    print(json.dumps(figures) if args.json else bench.format_table(figures))
    return 1 if figures.get("failed_sections", "none") != "none" else 0


def _prep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=_positive_int, default=4, help="phantom cases (default 4)")
    p.add_argument("--size", type=_positive_int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"),
                   help="image size in voxels (default 512 512 300)")
    p.add_argument("--spacing", type=_positive_float, nargs=3, default=(0.8, 0.8, 1.5), metavar=("X", "Y", "Z"),
                   help="voxel spacing in mm (default 0.8 0.8 1.5)")


def _run_prep(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.prep import bench_prep

    return bench_prep(cases=args.cases, size_xyz=tuple(args.size), spacing_xyz=tuple(args.spacing), seed=args.seed,
                      workdir=workdir, progress=progress)


def _infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=_positive_float, default=1.0, help="network width multiplier (default 1.0)")
    p.add_argument("--resolution", choices=("clinical", "coarse"), default="coarse", help="phantom preset")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batched run's size (default: config)")
    p.add_argument("--repeats", type=_positive_int, default=1, help="timed runs per batch size (default 1)")


def _run_infer(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.infer import bench_infer

    return bench_infer(width=args.width, resolution=args.resolution, batch_size=args.batch_size,
                       repeats=args.repeats, seed=args.seed, workdir=workdir, progress=progress)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=_positive_float, default=0.25, help="network width for throughput (default 0.25)")
    p.add_argument("--crop", type=_positive_int, nargs=3, default=(64, 48, 48), metavar=("Z", "Y", "X"),
                   help="crop size in voxels (default 64 48 48)")
    p.add_argument("--spacing-mm", type=_positive_float, default=2.0, help="voxel spacing (default 2.0)")
    p.add_argument("--workers", type=_nonneg_int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=_positive_int, default=16, help="timed steps per path (default 16)")
    p.add_argument("--no-memory", action="store_true", help="skip the (slow) default-network memory measurement")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=(),
                   help="also time the in-memory steps in each of these precisions, rounds alternating "
                   "(e.g. --precisions fp32 bf16: model_crops_per_s_fp32, _bf16 and bf16_to_fp32_speed)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a config field of the measured network, e.g. --set model.lstm_hidden=128 (repeatable)")


def _run_train(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.train import bench_train

    return bench_train(width=args.width, crop_size=tuple(args.crop), spacing_mm=args.spacing_mm,
                       workers=args.workers, threads=args.threads, steps=args.steps, memory=not args.no_memory,
                       seed=args.seed, workdir=workdir, progress=progress, overrides=_overrides(args.set),
                       precisions=tuple(dict.fromkeys(args.precisions)))


def _learn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-cases", type=_positive_int, default=24,
                   help="phantoms for training and validation together (default 24: with --val-cases 4, 20 train)")
    p.add_argument("--val-cases", type=_positive_int, default=4, help="of them, validation phantoms (default 4)")
    p.add_argument("--test-cases", type=_positive_int, default=12, help="held-out phantoms (default 12)")
    p.add_argument("--phantom-seed", type=_nonneg_int, default=0,
                   help="seed of the phantoms (default 0); --seed is the training seed")
    p.add_argument("--minutes", type=_positive_float, default=8.0, help="training budget in minutes (default 8)")
    p.add_argument("--width", type=_positive_float, default=0.25, help="network width (default 0.25)")
    p.add_argument("--crop", type=_positive_int, nargs=3, default=(48, 32, 32), metavar=("Z", "Y", "X"),
                   help="crop size in voxels (default 48 32 32)")
    p.add_argument("--spacing-mm", type=_positive_float, default=4.0, help="voxel spacing (default 4.0)")
    p.add_argument("--lr", type=_positive_float, default=0.003, help="initial learning rate (default 0.003)")
    p.add_argument("--crops", type=_positive_int, default=None,
                   help="train on this many crops (whole epochs) instead of --minutes, for ablations")
    p.add_argument("--whole-ct-every", type=_nonneg_int, default=5, metavar="K",
                   help="label the validation CTs whole after epoch 1, every K-th and the last, for minutes_to_85 "
                        "and to choose best.pt (default 5; 0: never, and best.pt by the validation crop loss)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a config field for this run, e.g. --set loss.map_reg=none (repeatable)")
    p.add_argument("--plot", metavar="PNG",
                   help="draw the whole-CT validation curve (id rate against training minutes) into this PNG "
                        "(`vertstudy bench plot` draws several saved runs together)")


def _png_to_write(option: str, name: str) -> Path:
    """``name`` as the PNG an option names, checked before any work: ends in .png, in a folder
    this user can write to (created when missing). ``ConfigError`` naming the option otherwise."""
    if not name.lower().endswith(".png"):
        raise ConfigError(f"{option} {name!r}: expected a file name ending in .png")
    folder = next(p for p in Path(name).resolve().parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(f"{option} {name!r}: {folder} is not a folder this user can write to")
    return Path(name)


def _run_learn(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.learn import bench_learn, plot_learning

    plot = _png_to_write("bench learn: --plot", args.plot) if args.plot is not None else None
    figures = bench_learn(
        train_cases=args.train_cases, val_cases=args.val_cases, test_cases=args.test_cases, minutes=args.minutes,
        width=args.width, crop_size=tuple(args.crop), spacing_mm=args.spacing_mm, lr=args.lr,
        phantom_seed=args.phantom_seed, seed=args.seed, workdir=workdir, progress=progress, crops=args.crops,
        overrides=_overrides(args.set), whole_ct_every=args.whole_ct_every,
    )
    if plot is not None:
        figures["plot"] = str(plot_learning(plot, [figures]))
    return figures


def cmd_bench_plot(args: argparse.Namespace) -> int:
    """``vertstudy bench plot``: the whole-CT validation curves of saved ``bench learn --json`` runs."""
    from vertstudy.bench.learn import plot_learning, read_learn_figures

    out = _png_to_write("bench plot: --out", args.out)
    runs = [read_learn_figures(Path(name)) for name in args.runs]
    print(plot_learning(out, runs))
    return 0


def _overrides(items: list[str] | None) -> dict:
    """``["loss.map_reg=none", "data.crop.anywhere_fraction=0"]`` -> a dict of YAML-parsed values."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. loss.map_reg=none")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=_positive_int, default=8, help="identical trials (default 8)")
    p.add_argument("--concurrency", type=_positive_int, default=2, help="trials at once, both ways (default 2)")
    p.add_argument("--epochs", type=_positive_int, default=4, help="epochs per trial: its fixed compute (default 4)")
    p.add_argument("--wandb", choices=("offline", "disabled"), default="offline", help="W&B on the platform side")


def _run_study(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.study import bench_study

    return bench_study(trials=args.trials, concurrency=args.concurrency, epochs=args.epochs, wandb=args.wandb,
                       workdir=workdir, progress=progress)


def _tables_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=_positive_int, nargs="+", default=(10, 100, 1000), metavar="N",
                   help="ended trials at which one refresh is timed (default 10 100 1000)")
    p.add_argument("--epochs", type=_positive_int, default=70, help="epochs per trial (default 70)")
    p.add_argument("--cases", type=_positive_int, default=60, help="held-out cases per trial (default 60)")
    p.add_argument("--vertebrae", type=_positive_int, default=25, help="vertebra rows per case (default 25)")
    p.add_argument("--repeats", type=_positive_int, default=3,
                   help="timed new refreshes; the median counts (default 3)")


def _run_tables(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.tables import bench_tables

    return bench_tables(sizes=tuple(args.trials), epochs=args.epochs, cases=args.cases, vertebrae=args.vertebrae,
                        repeats=args.repeats, workdir=workdir, progress=progress)


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=_positive_int, default=6, help="trials of the throughput study (default 6)")
    p.add_argument("--epochs", type=_positive_int, default=16, help="epochs per throughput trial (default 16)")
    p.add_argument("--recovery-epochs", type=_positive_int, default=12,
                   help="epochs of the 2 trials of the recovery run (default 12; the kill comes at epoch 3)")


def _run_cluster(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.cluster import bench_cluster

    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda _: None)
    return bench_cluster(trials=args.trials, epochs=args.epochs, recovery_epochs=args.recovery_epochs,
                         workdir=workdir, log=log)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=_positive_int, default=50, help="trials of the study (default 50)")
    p.add_argument("--concurrency", type=_positive_int, default=2, help="trials at once (default 2)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="epochs per trial (default 2)")
    p.add_argument("--builds", type=_positive_int, default=3, help="timed report builds; the median counts (default 3)")


def _run_report(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.report import bench_report

    return bench_report(trials=args.trials, concurrency=args.concurrency, epochs=args.epochs, builds=args.builds,
                        workdir=workdir, progress=progress)


def _gpu_arguments(p: argparse.ArgumentParser) -> None:
    from vertstudy.bench.gpu import add_arguments  # standard library only at import: no torch here

    add_arguments(p)


def _run_gpu(args: argparse.Namespace, workdir: Path | None, progress: bool) -> dict:
    from vertstudy.bench.gpu import run_from_args

    return run_from_args(args, progress)


BENCHMARKS: tuple[_Bench, ...] = (
    _Bench("prep", "preprocessing throughput on 1 and 2 processes, and a cached rerun",
           "Write realistic-size phantoms, preprocess them on one and on two processes into fresh caches, then "
           "rerun on a warm cache; report cases/s and ratios.",
           _prep_arguments, _run_prep, _format_table_of("prep"),
           workdir_help="folder for the phantoms and caches (default: a temporary folder, removed)",
           seed_help="phantom seed (default 0)"),
    _Bench("infer", "seconds to label one whole phantom CT, batched versus batch 1",
           "Label one phantom CT with the configured inference batch size and with batch 1, side by side; an "
           "untrained network of the given width (timing does not depend on the weights).",
           _infer_arguments, _run_infer, _format_table_of("infer"),
           workdir_help="folder for the phantom (default: a temporary folder, removed)",
           seed_help="phantom and weight seed (default 0)"),
    _Bench("train", "training crops/s through the DataLoader versus in-memory, FLOPs, memory",
           "Side by side in one run: crops/s of real training steps fed by the DataLoader from the cache and fed "
           "by pre-made in-memory tensors, their ratio, FLOPs per step against the measured float32 matmul "
           "FLOP/s, and the peak memory of one step of the default network (CPU) with a GPU estimate.",
           _train_arguments, _run_train, _format_table_of("train"),
           workdir_help="folder for phantoms and cache (default: a temporary folder, removed)",
           seed_help="seed (default 0)"),
    _Bench("learn", "train a CPU-sized network, score whole CTs against the mean baseline",
           "Write and prepare coarse phantoms, train for a fixed time budget while labelling the validation CTs "
           "whole (minutes_to_85: training minutes until they reach 0.85 identification), and report held-out "
           "whole-CT localization error and identification rate against predicting each class's mean position.",
           _learn_arguments, _run_learn, _format_table_of("learn"),
           workdir_help="folder for phantoms, cache and checkpoints (default: temporary, removed)",
           seed_help="training seed: initial weights and crop order (default 0); --phantom-seed draws the data"),
    _Bench("study", "wall time of identical trials through the platform versus plain Optuna",
           "Identical short trials through Ray Tune + W&B + tables versus Optuna alone in one process, same "
           "concurrency; the platform's overhead per trial.",
           _study_arguments, _run_study, _format_table_of("study"),
           workdir_help="keep phantoms, cache and results here (default: a temporary directory)"),
    _Bench("tables", "seconds of one refresh of the study tables at 10, 100 and 1,000 ended trials, old versus new",
           "Simulated ended trials in Ray's folders (no training): when the N-th trial ends, one refresh that "
           "rewrites the three tables whole from every trial (the old way) beside one that adds the new trial's "
           "rows (parts); also reading the tables while the study runs, and the compaction at its end.",
           _tables_arguments, _run_tables, _format_table_of("tables"),
           workdir_help="keep the simulated study here (default: a temporary folder, removed)"),
    _Bench("cluster", "throughput on 1 versus 2 worker nodes, and recovery from a dead node",
           "Real local multi-node clusters: the same study on 1 and on 2 worker nodes (trials per minute), then a "
           "worker SIGKILLed mid-trial (seconds until its trial is detected, restarted and reporting again on "
           "another node).",
           _cluster_arguments, _run_cluster, _format_table_of("cluster"),
           workdir_help="parent of the temporary clusters and studies (default /tmp; keep it short)"),
    _Bench("report", "time building a report from a real study of N trials",
           "Run a real smoke-scale random search of N trials (B, lambda, lr, LR schedule, crop size) on a local "
           "Ray cluster, then build its report several times; report the median build time and the report's size.",
           _report_arguments, _run_report, _format_table_of("report"),
           workdir_help="keep phantoms, study and reports here (default: a temporary directory, removed)"),
    _Bench("gpu", "the paper's network on a GPU: crops/s, peak memory against the estimate, TFLOP/s, labelling time",
           "Training steps (fp32 and bf16 autocast) at the paper's size, inference at batch 1, 4 and 8, and the "
           "network's time over every tile of a 2 mm whole-CT-sized volume, on one device (default CUDA when "
           "present). Needs only torch, numpy and pydantic: on a bare GPU machine run it as "
           "`python -m vertstudy.bench.gpu` from a checkout.",
           _gpu_arguments, _run_gpu, _format_table_of("gpu"),
           workdir_help="unused (bench gpu writes no files)", seed_help="weights and data seed (default 0)"),
)


def _add_bench_commands(top: argparse._SubParsersAction) -> None:
    """``vertstudy bench BENCHMARK``: one subcommand per entry of BENCHMARKS."""
    bench = top.add_parser("bench", help="measure the figures the issues ask for",
                           description="Benchmarks: each prints a table, or one JSON object with --json.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for b in BENCHMARKS:
        p = bench_sub.add_parser(b.name, help=b.help, description=b.description)
        b.add_arguments(p)
        if b.seed_help is not None:
            p.add_argument("--seed", type=_nonneg_int, default=0, help=b.seed_help)
        p.add_argument("--workdir", help=b.workdir_help)
        p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
        p.set_defaults(func=functools.partial(cmd_bench, b))
    p = bench_sub.add_parser(
        "plot", help="draw saved bench learn runs' whole-CT validation curves together",
        description="Draw the whole-CT validation curves (identification rate against training minutes, 85 %% "
                    "marked) of `vertstudy bench learn` runs whose --json output was saved, one line per run, into "
                    "one PNG. A file may hold a log that ends with the JSON line.")
    p.add_argument("runs", nargs="+", metavar="RUN_JSON", help="what `vertstudy bench learn --json` printed")
    p.add_argument("--out", required=True, metavar="PNG", help="the PNG to write (replaced whole)")
    p.set_defaults(func=cmd_bench_plot)


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vertstudy",
        description="Hyperparameter and ablation studies of the residual multi-label vertebra labeling network.",
    )
    parser.add_argument("--version", action="version", version=f"vertstudy {__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_data_commands(top)
    _add_predict_command(top)
    _add_diagnose_command(top)
    _add_study_commands(top)
    _add_cluster_commands(top)
    _add_report_command(top)
    _add_bench_commands(top)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vertstudy.study.compat import driver_environment

    os.environ.update(driver_environment(os.environ))  # the entry point sets what Tune reads from it
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_lease", False):
        os.environ["VERTSTUDY_NO_LEASE"] = "1"  # read by vertstudy.study.lease.DriverLease
    try:
        return int(args.func(args) or 0)
    except VertstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror}; free space, then run the command again (a study: `vertstudy study "
              "resume <storage>/<name>` keeps every trial that ended)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
