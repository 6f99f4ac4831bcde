"""Reports of finished (or running) studies, as a pure function of their Parquet tables.

``build_report(study_dirs, out, date=...)`` writes ``report.md`` (+ ``figures/*.png``),
``report.html`` (self-contained), ``tables.tex`` (booktabs) and ``report.json``: the paper's
Tables I-IV with spreads over seeds and bootstrap intervals over cases, Table V (K-means versus
sequence decoding of the same checkpoints), the search summary,
robustness by phantom condition, a failure gallery and the compute cost.

Modules, one job each: :mod:`~vertstudy.report.load` (tables in), :mod:`~vertstudy.report.stats`
(figures, seeds, bootstrap), :mod:`~vertstudy.report.ablation` (Tables I-IV),
:mod:`~vertstudy.report.diagnosis` (Table V and where identification is lost),
:mod:`~vertstudy.report.search`, :mod:`~vertstudy.report.robustness`, :mod:`~vertstudy.report.cost`,
:mod:`~vertstudy.report.figures` (PNGs), :mod:`~vertstudy.report.published` (the paper's rows),
:mod:`~vertstudy.report.document` (the sections and tables.tex), :mod:`~vertstudy.report.render`
(Markdown, HTML, LaTeX writers) and :mod:`~vertstudy.report.build` (the folder, written atomically).
"""

from vertstudy.report.build import Built, build_report

__all__ = ["Built", "build_report"]
