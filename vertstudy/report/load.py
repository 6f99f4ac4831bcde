"""Reading the studies' Parquet tables (the report's only input) into pandas frames.

Each study directory ``<storage>/<name>/`` (a local path or a URI pyarrow reads) holds
``trials``, ``epochs``, ``vertebrae``, ``baseline`` and ``cases`` ``.parquet`` (their contract:
:mod:`vertstudy.study.schema`). Only ``trials.parquet`` is required; older studies lack ``cases.parquet``, the
centroid columns of the vertebra rows and the trials' start times and resources, and the
report says what it skips for that reason.

Frames of several studies are concatenated; a trial is identified by ``key`` =
``"<study>/<trial_id>"``. Rows are sorted (study, trial, case, label), so the report does not
depend on the order in which directories are given or rows were written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from vertstudy.errors import InputError
from vertstudy.study import storage
from vertstudy.study.schema import POINT_COLUMNS, TRIAL_NUMBERS, TRIAL_TEXTS, VERTEBRA_FLAGS
from vertstudy.study.tables import read_table


@dataclass
class Study:
    """One study directory's tables (pandas frames; possibly empty)."""

    name: str
    location: str  # as given (canonical path or URI); never written into the report
    trials: pd.DataFrame
    epochs: pd.DataFrame
    vertebrae: pd.DataFrame
    baseline: pd.DataFrame
    cases: pd.DataFrame


@dataclass
class Tables:
    """All studies' tables concatenated (``study`` column on every frame, ``key`` on trials,
    epochs and vertebrae). ``studies``: names, sorted."""

    studies: list[str]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    vertebrae: pd.DataFrame
    baseline: pd.DataFrame
    cases: pd.DataFrame
    #: per study: what its tables lack (``"cases"``, ``"points"``, ``"times"``, ``"resources"``)
    lacks: dict[str, set[str]] = field(default_factory=dict)

    def has_points(self) -> bool:
        return all(c in self.vertebrae.columns for c in POINT_COLUMNS)


def _frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas()


def _read(location: str, name: str) -> pd.DataFrame:
    try:
        return _frame(read_table(location, name))
    except (OSError, ValueError, pa.ArrowException) as exc:  # truncated or not Parquet
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(storage.uri_join(location, f"{name}.parquet"), f"cannot read the table ({first})") from None


def read_study(location: str) -> Study:
    """The tables of one study directory. ``InputError`` naming the directory when it does not
    exist, is not a directory, or has no ``trials.parquet``."""
    given = str(location)
    location = storage.canonical(given)
    fs, path = storage.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(given, "no such study directory")
    if info.type != pafs.FileType.Directory:
        raise InputError(given, "not a directory; give a study directory <storage>/<study name>")
    if fs.get_file_info(storage.join(path, "trials.parquet")).type == pafs.FileType.NotFound:
        raise InputError(given, "no trials.parquet here: not a study directory (give <storage>/<study name>, "
                                "the folder `vertstudy study run` writes its tables into)")
    trials = _read(location, "trials")
    name = str(trials["study"].iloc[0]) if len(trials) else path.rstrip("/").rsplit("/", 1)[-1]
    frames = {n: _read(location, n) for n in ("epochs", "vertebrae", "baseline", "cases")}
    return Study(name=name, location=location, trials=trials, **frames)


def _normal_trials(df: pd.DataFrame, study: str) -> pd.DataFrame:
    df = df.copy()
    df["study"] = study
    df["trial_id"] = df["trial_id"].astype(str) if len(df) else pd.Series([], dtype=object)
    for col in TRIAL_NUMBERS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float) if col in df else math.nan
    for col in TRIAL_TEXTS:
        df[col] = df[col].fillna("").astype(str) if col in df else ""
    df.loc[df["params"] == "", "params"] = "{}"
    df["key"] = df["study"] + "/" + df["trial_id"]
    return df


def _normal_rows(df: pd.DataFrame, study: str) -> pd.DataFrame:
    """Vertebra or baseline rows with typed flag / error / label columns."""
    df = df.copy()
    df["study"] = study
    if not len(df):
        return df
    df["trial_id"] = df["trial_id"].astype(str)
    df["case"] = df["case"].astype(str)
    for col in VERTEBRA_FLAGS:
        df[col] = df[col].fillna(False).astype(bool)
    df["label"] = df["label"].astype(int)
    df["error_mm"] = pd.to_numeric(df["error_mm"], errors="coerce").astype(float)
    for col in POINT_COLUMNS:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["key"] = df["study"] + "/" + df["trial_id"]
    return df


def _concat(frames: list[pd.DataFrame], sort: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in sort})
    df = pd.concat(frames, ignore_index=True, sort=False)
    keys = [c for c in sort if c in df.columns]
    return df.sort_values(keys, kind="mergesort").reset_index(drop=True)


def start_order(trials: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """``trials`` in the order they started (ties and tables without start times: by trial key),
    and whether start times gave the order."""
    if trials["started_at"].notna().all() and len(trials):
        return trials.sort_values(["started_at", "key"], kind="mergesort"), True
    return trials.sort_values("key", kind="mergesort"), False


def load_tables(locations: list[str]) -> Tables:
    """Read every study directory (``InputError`` for the first bad one, before anything is
    written); ``InputError`` too when two directories hold the same study name."""
    studies: dict[str, Study] = {}
    for location in locations:
        study = read_study(location)
        if study.name in studies:
            raise InputError(location, f"holds study {study.name!r}, like {studies[study.name].location}; "
                                       "give each study once")
        studies[study.name] = study
    names = sorted(studies)
    lacks: dict[str, set[str]] = {}
    for name in names:
        s = studies[name]
        missing = set()
        if not len(s.cases):
            missing.add("cases")
        if len(s.vertebrae) and not all(c in s.vertebrae.columns for c in POINT_COLUMNS):
            missing.add("points")
        if "started_at" not in s.trials.columns:
            missing.add("times")
        if "resources_cpu" not in s.trials.columns:
            missing.add("resources")
        lacks[name] = missing
    trials = _concat([_normal_trials(studies[n].trials, n) for n in names], ["study", "trial_id"])
    epochs = []
    for n in names:
        e = studies[n].epochs.copy()
        e["study"] = n
        if len(e):
            e["trial_id"] = e["trial_id"].astype(str)
            e["key"] = n + "/" + e["trial_id"]
        epochs.append(e)
    cases = []
    for n in names:
        c = studies[n].cases.copy()
        c["study"] = n
        cases.append(c)
    tables = Tables(
        studies=names,
        trials=trials,
        epochs=_concat(epochs, ["study", "trial_id", "epoch"]),
        vertebrae=_concat([_normal_rows(studies[n].vertebrae, n) for n in names],
                          ["study", "trial_id", "case", "label"]),
        baseline=_concat([_normal_rows(studies[n].baseline, n) for n in names], ["study", "case", "label"]),
        cases=_concat(cases, ["study", "case"]),
        lacks=lacks,
    )
    if not len(tables.trials):
        tables.trials = _normal_trials(pd.DataFrame({"study": [], "trial_id": []}), "")
    for frame, cols in ((tables.vertebrae, ("key", "case", "label", "region", *VERTEBRA_FLAGS, "error_mm")),
                        (tables.baseline, ("key", "case", "label", "region", *VERTEBRA_FLAGS, "error_mm"))):
        for col in cols:
            if col not in frame.columns:
                frame[col] = pd.Series([], dtype=object)
    return tables
