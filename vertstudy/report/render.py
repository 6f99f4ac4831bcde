"""Writers of the report document: Markdown, self-contained HTML and booktabs LaTeX.

The report is built as a list of blocks (:class:`Heading`, :class:`Para`, :class:`Bullets`,
:class:`Table`, :class:`Image`); the Markdown and the HTML are two renderings of the same
blocks, so no Markdown parser is needed. Text may carry two inline marks, ``**bold**`` and
```code```, which both writers understand. The HTML has inline CSS, embeds every image as a
``data:image/png;base64`` URI and links nothing outside itself, so it opens offline.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    kind: str = ""  # "" | "note" | "missing" | "published"


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    kind: str = "ours"  # "ours" | "published"
    align: list[str] = field(default_factory=list)  # "l" | "r" per column; default: first left, rest right


@dataclass
class Image:
    src: str  # relative to the report folder, e.g. figures/history.png
    alt: str
    caption: str = ""


Block = Heading | Para | Bullets | Table | Image

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


_NUMERIC = re.compile(r"^(—|-|n/a|[-+]?\d.*)$")


def _align(t: Table) -> list[str]:
    """Given alignments, or: the first column left, then right for columns whose cells all look
    like numbers (a dash counts), left for text."""
    if t.align:
        return t.align
    out = ["l"]
    for j in range(1, len(t.columns)):
        cells = [str(r[j]) for r in t.rows if j < len(r)]
        out.append("r" if cells and all(_NUMERIC.match(c) for c in cells) else "l")  # numbers, 8.8(13.0), 2/26
    return out


# -- Markdown ------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(f"> {b.text}" if b.kind in ("missing", "published") else b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = []
            if b.caption:
                lines += [f"*{b.caption}*" if b.kind == "published" else b.caption, ""]
            lines.append("| " + " | ".join(_md_cell(c) for c in b.columns) + " |")
            lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in _align(b)) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.src})" + (f"\n\n{b.caption}" if b.caption else ""))
    return "\n\n".join(out) + "\n"


# -- HTML ----------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: .15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.4em 0; font-size: 0.9em; }
caption { caption-side: top; text-align: left; padding: .3em 0; color: #333; }
th, td { padding: .25em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }
thead th { border-bottom: 2px solid #555; background: #f4f4f4; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
table.published { background: #fbf7ea; border: 1px dashed #b59b47; }
table.published caption { font-style: italic; color: #6b5a1e; }
p.missing { background: #fdecea; border-left: 4px solid #d62728; padding: .4em .7em; }
p.note { color: #444; font-size: .92em; }
p.published { background: #fbf7ea; border-left: 4px solid #b59b47; padding: .4em .7em; }
figure { margin: 1em 0 2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; }
code { background: #f2f2f2; padding: 0 .2em; border-radius: 3px; }
"""


def inline_html(text: str) -> str:
    """Escape ``text`` and turn ``**bold**`` / ```code``` into HTML."""
    escaped = html.escape(str(text), quote=False)
    escaped = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", escaped)
    return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", escaped)


def to_html(blocks: list[Block], title: str, image: Callable[[str], bytes]) -> str:
    """One self-contained HTML page; ``image(src)`` returns the PNG bytes of an image block."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f'<h{b.level} id="{slug(b.text)}">{inline_html(b.text)}</h{b.level}>')
        elif isinstance(b, Para):
            cls = f' class="{b.kind}"' if b.kind else ""
            body.append(f"<p{cls}>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>\n" + "\n".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "\n</ul>")
        elif isinstance(b, Table):
            align = _align(b)
            head = "".join(f'<th class="{a}">{inline_html(c)}</th>' for c, a in zip(b.columns, align))
            rows = "\n".join("<tr>" + "".join(f'<td class="{a}">{inline_html(c)}</td>' for c, a in zip(row, align))
                             + "</tr>" for row in b.rows)
            caption = f"<caption>{inline_html(b.caption)}</caption>" if b.caption else ""
            body.append(f'<table class="{b.kind}">{caption}\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n'
                        "</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(image(b.src)).decode("ascii")
            cap = f"<figcaption>{inline_html(b.caption)}</figcaption>" if b.caption else ""
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.alt)}">{cap}</figure>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# -- LaTeX ---------------------------------------------------------------------------------
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "---", "–": "--",
        "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$", "λ": r"$\lambda$"}


def tex(text: str) -> str:
    """``text`` escaped for LaTeX (inline marks dropped; a few symbols as math)."""
    text = _CODE.sub(lambda m: m.group(1), _BOLD.sub(lambda m: m.group(1), str(text)))
    return "".join(_TEX.get(ch, ch) for ch in text)


def _tabular(t: Table) -> list[str]:
    spec = "".join(_align(t))
    # shrunk to the line width when wider (graphicx), kept at its natural size otherwise
    lines = [r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(tex(c) for c in t.columns) + r" \\",
             r"\midrule"]
    lines += [" & ".join(tex(c) for c in row) + r" \\" for row in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}}"]
    return lines


def latex_table(label: str, caption: str, ours: Table | None, published: Table | None, missing: str | None) -> str:
    """One ``table`` environment: our tabular (or the missing-trials sentence), then the published
    rows in a separate tabular under their own heading."""
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small", rf"\caption{{{tex(caption)}}}", rf"\label{{{label}}}"]
    if missing:
        lines.append(rf"\par\emph{{{tex(missing)}}}\par\medskip")
    if ours is not None and ours.rows:
        lines += _tabular(ours)
    if published is not None:
        lines += ["", r"\medskip", rf"\emph{{{tex(published.caption)}}}\par\smallskip", *_tabular(published)]
    lines.append(r"\end{table}")
    return "\n".join(lines)
