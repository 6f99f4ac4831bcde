"""``vertstudy bench <what>``: commands that measure the figures the issues ask for.

Each returns a flat dict of figures whose names carry their units; the CLI prints it as a
table or, with ``--json``, as one JSON object. Ratios are measured side by side in one run.
"""

from __future__ import annotations


def format_figures(title: str, figures: dict) -> str:
    """A plain two-column table of ``figures`` under ``title``."""
    width = max(len(k) for k in figures)
    lines = [title, "-" * len(title)]
    for key, value in figures.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)
