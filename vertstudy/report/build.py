"""``build_report``: study directories in, a report folder out, as a pure function of the tables.

The folder holds ``report.md`` with its PNG figures under ``figures/``, a self-contained
``report.html`` (images embedded), ``tables.tex`` (booktabs, one ``table`` per Table I-V) and
``report.json`` (every number of the tables, for machines and tests). The only input besides the
Parquet tables is the date in the header, so the same tables and date give byte-identical files.

The report is built in a hidden folder beside ``out`` and renamed into place when complete; an
existing ``out`` (an earlier report) is replaced only then. Bad inputs are found before anything
is written.

:func:`track_report` (``vertstudy report --wandb``) then logs the finished folder to W&B as the
artifact of a new run of job type ``report`` in the group of the first study given.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vertstudy.errors import ConfigError
from vertstudy.report.ablation import all_tables, choose
from vertstudy.report.diagnosis import decoder_section, decoder_table, loss_section
from vertstudy.report.document import (
    cost_section,
    definitions,
    gallery_section,
    latex,
    robustness_section,
    search_section,
    status_section,
    tables_section,
)
from vertstudy.report.load import load_tables
from vertstudy.report.render import Block, Heading, Para, to_html, to_markdown
from vertstudy.report.stats import Estimate, clean
from vertstudy.study.tracking import WandbSettings


@dataclass
class Built:
    """What :func:`build_report` wrote."""

    out: Path
    files: list[Path]
    figures: int
    bytes: int
    html_bytes: int
    seconds: float


FIGURES = "figures"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Estimate):
        return x.to_json()
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return clean(x)
    return x



# -- progress ------------------------------------------------------------------------------
@contextmanager
def _steps(enabled: bool, total: int):
    """Yield ``step(text)``: a rich progress bar on stderr when enabled."""
    if not enabled:
        yield lambda text: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("report", total=total)

        def step(text: str) -> None:
            bar.update(task, advance=1, description=text)

        yield step


# -- build ---------------------------------------------------------------------------------
def _check_date(date: str | None) -> str:
    if date is None:
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        return dt.date.fromisoformat(date).isoformat()
    except ValueError:
        raise ConfigError(f"--date {date!r}: expected a date YYYY-MM-DD") from None


def _prepare_out(out: Path) -> Path:
    """Check ``out`` and make the hidden build folder beside it; ``ConfigError`` naming ``out``."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a folder; give a new folder for the report")
        if any(out.iterdir()) and not (out / "report.md").exists():
            raise ConfigError(f"--out {out}: exists and is not a vertstudy report (no report.md), so it is not "
                              "replaced; give a new folder or an earlier report's")
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        (tmp / FIGURES).mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the report there ({exc.strerror or exc})") from None
    return tmp


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``, replacing an earlier report only now."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:  # put the earlier report back
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_report(locations: list[str], out: str | Path, date: str | None = None, chosen: str | None = None,
                 progress: bool = False) -> Built:
    """Build the report of the studies at ``locations`` into the folder ``out`` (see the module
    docstring). ``date``: YYYY-MM-DD for the header (default: today, UTC); ``chosen``: a trial id
    whose configuration Table IV reports (default: chosen on validation figures)."""
    t0 = time.perf_counter()
    date = _check_date(date)
    out = Path(out).expanduser().absolute()
    tables = load_tables([str(x) for x in locations])  # every input error before anything is written
    choice = choose(tables, chosen)
    tmp = _prepare_out(out)
    try:
        with _steps(progress, 6) as step:
            step("tables I-V")
            drawn: list[str] = []

            def draw(name: str, fn, *args) -> str:
                fn(tmp / FIGURES / name, *args)
                drawn.append(name)
                return f"{FIGURES}/{name}"

            results = [*all_tables(tables, choice), decoder_table(choice)]
            status_blocks, status = status_section(tables)
            step("search summaries")
            search_blocks, search = search_section(tables, draw)
            step("robustness")
            robust_blocks, robust = robustness_section(tables, choice, draw)
            step("failure gallery")
            gallery_blocks, gallery = gallery_section(tables, choice, draw)
            loss_blocks, loss = loss_section(choice)
            decoder_blocks, decoders = decoder_section(choice)
            step("cost")
            cost_blocks, cost = cost_section(tables, draw)
            step("writing")
            title = f"vertstudy report: {', '.join(tables.studies)} ({date})"
            versions = sorted({f"{v or '?'} (git {s[:7] or '?'})" for v, s in
                               zip(tables.trials["vertstudy_version"], tables.trials["git_sha"])})
            blocks: list[Block] = [
                Heading(1, f"vertstudy report: {', '.join(tables.studies)}"),
                Para(f"Date: {date}. Built from the Parquet tables of {len(tables.studies)} "
                     f"stud{'y' if len(tables.studies) == 1 else 'ies'} ({', '.join(tables.studies)}), "
                     f"{len(tables.trials)} ended trial(s)" + (f"; trials ran with vertstudy {', '.join(versions)}"
                                                              if versions else "") + "."),
                *status_blocks, *tables_section(results), *search_blocks, *robust_blocks, *loss_blocks,
                *decoder_blocks, *gallery_blocks, *cost_blocks, *definitions(),
            ]
            files = {
                "report.md": to_markdown(blocks),
                "report.html": to_html(blocks, title, lambda src: (tmp / src).read_bytes()),
                "tables.tex": latex(results, date, tables.studies),
                "report.json": json.dumps(_jsonable({
                    "report": "vertstudy", "date": date, "studies": tables.studies, "status": status,
                    "tables": {r.key: r.to_json() for r in results}, "search": search, "robustness": robust,
                    "where_lost": loss, "decoders": decoders, "gallery": gallery, "cost": cost,
                    "figures": sorted(drawn),
                }), indent=1, allow_nan=False) + "\n",
            }
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            html_size = (tmp / "report.html").stat().st_size
            _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Built(out, [out / n for n in files], len(drawn), size, html_size, time.perf_counter() - t0)


def track_report(locations: list[str], built: Built, mode: str | None = None) -> tuple[WandbSettings, str | None]:
    """Log the report ``built`` of the studies at ``locations`` to W&B: a new run of job type ``report`` in the group
    (study name) of the first study given, with that study's W&B project and entity, written beside its trial and
    study runs (its ``wandb/`` folder when the study directory is local). A report pooling several studies is one
    document, so it is one run, tagged with every study's name and listing them in its config. Its artifact
    ``report-<study>`` (type ``report``) holds ``report.html``, ``report.json``, ``report.md``, ``tables.tex`` and
    ``figures/*.png`` (:func:`vertstudy.study.tracking.log_report`). ``mode``: offline, online or disabled; default
    the first study's ``wandb.mode`` (offline unless its file says otherwise; W&B's defaults for a study directory
    without its ``study.json``). Returns (the W&B settings used, the run id); the id is None when the mode is
    disabled or W&B failed (one warning line; the report is kept)."""
    import dataclasses

    from vertstudy.study import storage
    from vertstudy.study.runner import load_study_dir, wandb_settings
    from vertstudy.study.spec import WandbSpec
    from vertstudy.study.tracking import log_report

    first = storage.canonical(locations[0])
    if storage.exists(storage.uri_join(first, "study.json")):
        spec, _ = load_study_dir(first)
        name, settings = spec.name, wandb_settings(spec, first)
    else:  # tables only: the study's name as the report reads it, W&B's defaults
        from vertstudy.report.load import read_study

        name, default = read_study(first).name, WandbSpec()
        settings = WandbSettings(mode=default.mode, project=default.project, entity=default.entity,
                                 dir=storage.local_path(first) if storage.is_local(first) else None)
    if mode is not None:
        settings = dataclasses.replace(settings, mode=mode)
    report = json.loads((built.out / "report.json").read_text(encoding="utf-8"))
    config = {"studies": report["studies"], "date": report["date"], "out": str(built.out),
              "figures": len(report["figures"]), "status": report["status"]}  # ended trials by study and status
    return settings, log_report(settings, name, built.out, config, tags=report["studies"])
