"""Keeping a study's tables current at the cost of what each ended trial adds.

- :class:`TableRefresh` is what the driver calls after every trial end
  (:class:`vertstudy.study.live.TablesCallback`): it builds the outcome of each trial that
  ended in this driver and was not written yet, and writes its rows
  (:func:`vertstudy.study.tables.add_trials`: parts for ``epochs`` and ``vertebrae``, a row in
  ``trials.parquet``). Trials that ended before, in a driver since stopped, are not read again.
- :func:`sync_tables` makes the tables hold exactly the ended trials of the study's Ray results
  (the rule of :func:`vertstudy.study.results.ended_trials`), writing only the trials that are
  missing, ended differently or errored (Ray copies a failed trial's ``error.txt`` after the
  driver heard of it), and dropping the rows of trials that are no longer ended (a trial Ray
  does not know, an errored one running again); then merges the parts into the
  tables' files (:func:`vertstudy.study.tables.compact_tables`). The driver calls it when a
  study starts again (``study resume``) and when it ends; ``study export`` with ``rebuild``.

Before, every refresh read every ended trial's outcome again
(:func:`vertstudy.study.results.ended_outcomes`) and wrote the three tables whole
(:func:`vertstudy.study.tables.rewrite_tables`): a cost that grew with the study, which
``vertstudy bench tables`` measures beside this one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vertstudy.study.results import ended_trials, outcome
from vertstudy.study.schema import TrialOutcome
from vertstudy.study.spec import StudySpec
from vertstudy.study.tables import add_trials, compact_tables, delete_parts, read_table


@dataclass
class TableRefresh:
    """``refresh(ended, live)`` after a trial ends (pickled with the Tune callback that calls it).

    ``written``: ``{trial_id: complete|error}`` this refresh wrote; a trial is written again only
    when it ended differently since (errored, then retried and completed), or while its error
    row lacks the error. A refresh that failed writes its trials on the next call."""

    spec: StudySpec
    study_dir: str
    meta: dict[str, Any]
    written: dict[str, str] = field(default_factory=dict)

    def __call__(self, ended: dict[str, str], live: dict[str, list[dict]] | None = None) -> list[str]:
        """``ended``: ``{trial_id: complete|error}`` of the trials this driver saw end; ``live``:
        the results it received per trial (ahead of Ray's copy to the storage). Returns the
        trial ids written now."""
        new = {t: how for t, how in sorted(ended.items()) if self.written.get(t) != how}
        if new:
            live = live or {}
            outcomes = [outcome(self.spec, self.study_dir, t, how, live=live.get(t)) for t, how in new.items()]
            add_trials(self.study_dir, self.spec.name, outcomes, self.meta)
            # Ray copies a failed trial's error.txt to the storage after telling the driver: a row
            # without its error is written again at the next refresh (and at the study's end)
            self.written.update({o.trial_id: new[o.trial_id] for o in outcomes
                                 if new[o.trial_id] != "error" or o.error})
        return list(new)


def _statuses(study_dir: str) -> dict[str, str]:
    """``{trial_id: status}`` of ``trials.parquet`` (with its parts' trials)."""
    trials = read_table(study_dir, "trials")
    if "status" not in trials.column_names:
        return {}
    return dict(zip(trials["trial_id"].to_pylist(), trials["status"].to_pylist()))


def sync_tables(spec: StudySpec, study_dir: str, meta: dict[str, Any], rebuild: bool = False) -> dict[str, str]:
    """Make the tables hold exactly the study's ended trials, then compact them (module
    docstring). ``rebuild``: build every trial's rows again from Ray's results (``study
    export``). Returns ``{trial_id: status}`` of the ended trials, by trial id."""
    hows, built = ended_trials(spec, study_dir)
    have = _statuses(study_dir)
    drop = set(have) - set(hows)
    # an errored trial is built again: its error.txt may have reached the storage after its row
    stale = [t for t, how in hows.items() if rebuild or how == "error" or t not in have or have[t] == "error"]

    def outcomes() -> Iterator[TrialOutcome]:  # one at a time: a rebuild holds one trial's rows
        for t in stale:
            yield built.pop(t, None) or outcome(spec, study_dir, t, hows[t])

    delete_parts(study_dir, drop)  # first: a stop before the files are rewritten leaves the rows as they were
    if stale or drop:
        add_trials(study_dir, spec.name, outcomes(), meta, drop=drop)
    compact_tables(study_dir, drop=drop)
    return _statuses(study_dir)

