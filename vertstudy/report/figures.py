"""The report's PNG figures, drawn with matplotlib's object API (no pyplot state, no GUI).

Every function takes plain data and a path and writes one PNG. Output is byte-reproducible:
a fixed style (:data:`STYLE`), a fixed DPI and no ``Software`` metadata in the PNG. Units:
millimetres for positions and errors, percent for identification rates, hours for compute.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vertstudy.anatomy import NAMES

DPI = 110
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "image.interpolation": "nearest", "svg.hashsalt": "vertstudy",
}
STATUS_COLOURS = {"completed": "#1f77b4", "pruned": "#9a9a9a", "error": "#d62728", "diverged": "#ff7f0e"}
OURS, BASELINE = "#1f77b4", "#b0b0b0"


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def history(path: Path, trials: pd.DataFrame, order_note: str, study: str) -> Path:
    """Validation id rate (%) and localization error (mm) of each trial in start order, with the
    running best. ``trials``: ``order``, ``status``, ``best_val_id_rate``, ``best_val_loc_error_mm``."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(7.5, 5.0)
        top, bottom = fig.subplots(2, 1, sharex=True)
        x = trials["order"].to_numpy()
        specs = ((top, "best_val_id_rate", 100.0, "validation id. rate (%)", np.fmax),
                 (bottom, "best_val_loc_error_mm", 1.0, "validation loc. error (mm)", np.fmin))
        for ax, col, scale, label, better in specs:
            y = trials[col].astype(float).to_numpy() * scale
            for status, colour in STATUS_COLOURS.items():
                sel = trials["status"].to_numpy() == status
                if not sel.any():
                    continue
                if status in ("error", "diverged"):  # no figures: marked along the bottom edge
                    ax.scatter(x[sel], np.full(sel.sum(), 0.03), s=30, marker="v", color=colour, zorder=3,
                               transform=ax.get_xaxis_transform(), label=f"{status} (no figure)")
                else:
                    ax.scatter(x[sel], y[sel], s=22, color=colour, label=status, zorder=3)
            ranked = trials["status"].isin(("completed", "pruned")).to_numpy() & np.isfinite(y)
            fill = -np.inf if better is np.fmax else np.inf
            running = better.accumulate(np.where(ranked, y, fill)) if len(y) else y
            running = np.where(np.isinf(running), np.nan, running)
            ax.step(x, running, where="post", color="black", lw=1.2, label="best so far")
            ax.set_ylabel(label)
            if scale == 100.0:
                ax.set_ylim(-4, 104)
        top.set_title(f"{study}: optimization history ({order_note})")
        top.legend(loc="best", ncols=3)
        bottom.set_xlabel("trial number")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        return _save(fig, path)


def _axis_positions(values: list, numeric: bool):
    """(function value -> [0, 1] or NaN, [(position, tick label)], log scale?) for one parallel
    axis. Numbers: linear over the values seen, or log10 when all are > 0 and span a factor 5 or
    more (learning rates); text: evenly spaced categories in sorted order."""
    present = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return (lambda v: math.nan), [], False
    if numeric:
        nums = np.asarray(present, dtype=float)
        lo, hi = float(nums.min()), float(nums.max())
        log = lo > 0 and hi / lo >= 5
        f = np.log10 if log else (lambda v: v)
        a, b = float(f(lo)), float(f(hi))

        def pos(v):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                return math.nan
            return 0.5 if b == a else (float(f(float(v))) - a) / (b - a)

        distinct = sorted(set(nums.tolist()))
        if len(distinct) <= 5:
            ticks = distinct
        else:
            ticks = sorted({lo, hi} | {float(10 ** ((a + b) / 2)) if log else (lo + hi) / 2})
        return pos, [(pos(t), f"{t:.3g}") for t in ticks], log
    cats = sorted({str(v) for v in present})

    def pos_cat(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.nan
        return 0.5 if len(cats) == 1 else cats.index(str(v)) / (len(cats) - 1)

    return pos_cat, [(pos_cat(c), c) for c in cats], False


def parallel(path: Path, ranked: pd.DataFrame, params: list[str], labels: dict[str, str], study: str) -> Path:
    """Parallel coordinates of the ranked trials: one vertical axis per sampled parameter, then
    the validation id rate (%) and error (mm); lines coloured by the validation error (mm)."""
    df = ranked.copy()
    df["val. id rate (%)"] = df["best_val_id_rate"].astype(float) * 100
    df["val. error (mm)"] = df["best_val_loc_error_mm"].astype(float)
    columns = [f"param:{p}" for p in params] + ["val. id rate (%)", "val. error (mm)"]
    names = [labels.get(p, p) for p in params] + ["val. id rate (%)", "val. error (mm)"]
    axes, categorical = [], []
    for j, col in enumerate(columns):
        vals = list(df[col])
        numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in vals
                      if not (isinstance(v, float) and math.isnan(v)))
        pos, ticks, log = _axis_positions(vals, numeric)
        axes.append((pos, ticks))
        categorical.append(not numeric)
        if log:
            names[j] += " (log)"
    err = df["val. error (mm)"].to_numpy(float)
    finite = err[np.isfinite(err)]
    lo, hi = float(finite.min()), float(finite.max())
    norm = Normalize(lo, hi if hi > lo else lo + 1)
    cmap = matplotlib.colormaps["viridis_r"]
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        fig = _figure(max(6.5, 1.45 * len(columns) + 2.0), 4.6)
        ax = fig.add_subplot()
        order = np.argsort(-np.nan_to_num(err, nan=np.inf), kind="stable")  # best drawn last, on top
        for i in order:
            # trials on the same category are spread a little, so their number shows
            jitter = ((i % 9) - 4) * 0.006
            ys = [pos(v) + (jitter if cat else 0.0) for (pos, _), cat, v in zip(axes, categorical,
                                                                                 df.iloc[i][columns])]
            colour = cmap(norm(err[i])) if np.isfinite(err[i]) else "#cccccc"
            ax.plot(range(len(columns)), ys, color=colour, lw=1.3, alpha=0.85)
        for j, (_, ticks) in enumerate(axes):
            ax.axvline(j, color="black", lw=0.8)
            for p, text in ticks:
                ax.text(j - 0.04, p, text, ha="right", va="center", fontsize=7,
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.set_xticks(range(len(columns)), names)
        ax.set_yticks([])
        ax.set_xlim(-0.5, len(columns) - 0.8)
        ax.set_ylim(-0.06, 1.06)
        for side in ("left", "right", "top", "bottom"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"{study}: sampled parameters of {len(df)} ranked trials (each line one trial; "
                     "axes span the values seen)")
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="validation loc. error (mm)", shrink=0.9)
        return _save(fig, path)


def curves(path: Path, epochs: pd.DataFrame, keys: list[str], labels: list[str], study: str) -> Path:
    """Validation loss and localization error (mm) per epoch of the top trials."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(8.5, 3.6)
        left, right = fig.subplots(1, 2)
        for key, label in zip(keys, labels):
            e = epochs[epochs["key"] == key].sort_values("epoch")
            if not len(e):
                continue
            for ax, col in ((left, "val_loss"), (right, "val_loc_error_mm")):
                if col in e:
                    ax.plot(e["epoch"], e[col].astype(float), marker="o", ms=3, label=label)
        left.set_xlabel("epoch")
        left.set_ylabel("validation loss (L_cls + L_reg)")
        right.set_xlabel("epoch")
        right.set_ylabel("validation loc. error (mm)")
        left.set_title("validation loss")
        right.set_title("validation localization error")
        right.legend(loc="best", title="rank: trial")
        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{study}: learning curves of the top trials")
        return _save(fig, path)


def importances(path: Path, found: dict[str, float], labels: dict[str, str], target: str, study: str) -> Path:
    """Horizontal bars of the fANOVA importances (fractions summing to 1)."""
    names = list(found)[::-1]
    with matplotlib.rc_context(STYLE):
        fig = _figure(6.0, 0.45 * len(names) + 1.4)
        ax = fig.add_subplot()
        ax.barh([labels.get(n, n) for n in names], [found[n] for n in names], color=OURS)
        what = {"best_val_id_rate": "validation id. rate", "best_val_loc_error_mm": "validation loc. error"}
        ax.set_xlabel(f"fANOVA importance for the {what.get(target, target)} (fraction of variance)")
        ax.set_xlim(0, 1)
        ax.set_title(f"{study}: parameter importances")
        return _save(fig, path)


def robustness(path: Path, rows: list[dict]) -> Path:
    """Id rate (%) and mean error (mm) per condition value, ours beside the baseline."""
    tags = list(dict.fromkeys(r["tag"] for r in rows))
    with matplotlib.rc_context(STYLE):
        fig = _figure(max(6.0, 2.6 * len(tags)), 5.0)
        grid = fig.subplots(2, len(tags), squeeze=False)
        for j, tag in enumerate(tags):
            sel = [r for r in rows if r["tag"] == tag]
            x = np.arange(len(sel))
            for i, (metric, scale, label) in enumerate((("id_rate", 100.0, "id. rate (%)"),
                                                        ("loc_error_mm_mean", 1.0, "mean loc. error (mm)"))):
                ax = grid[i, j]
                ours = [np.nan if r[metric] is None else r[metric] * scale for r in sel]
                base = [np.nan if r[f"baseline_{metric}"] is None else r[f"baseline_{metric}"] * scale for r in sel]
                for dx, vals, colour, name in ((-0.2, ours, OURS, "chosen configuration"),
                                               (0.2, base, BASELINE, "mean-position baseline")):
                    bars = ax.bar(x + dx, vals, 0.4, color=colour, label=name)
                    ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.0f}" for v in vals], fontsize=7,
                                 padding=1)
                ax.set_xticks(x, [f"{r['value']}\n({r['n_cases']} case{'s' if r['n_cases'] != 1 else ''})"
                                  for r in sel])
                ax.margins(y=0.12)
                if j == 0:
                    ax.set_ylabel(label)
                if i == 0:
                    ax.set_title(tag)
                    ax.set_ylim(0, 112)
        grid[0, 0].legend(loc="upper left")
        fig.suptitle("held-out figures by phantom condition")
        return _save(fig, path)


def _grouped(points: list[tuple[float, float, str]], within: float) -> list[tuple[float, float, str]]:
    """Points closer than ``within`` (mm) merged into one label ``"C3, C4, C5"`` (at most four
    names, then ``+n``), so stacked predictions stay readable."""
    groups: list[list[tuple[float, float, str]]] = []
    for p in points:
        for g in groups:
            if math.hypot(g[0][0] - p[0], g[0][1] - p[1]) < within:
                g.append(p)
                break
        else:
            groups.append([p])
    out = []
    for g in groups:
        names = [n for _, _, n in g]
        text = ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
        out.append((g[0][0], g[0][1], text))
    return out


def _view(ax, image: np.ndarray, pixel_mm: float, origin_mm: float, rows: pd.DataFrame, across: str, title: str):
    """One view: ``image`` (z, across) with z up; centroids at (across, z) mm."""
    h, w = image.shape
    extent = (origin_mm - pixel_mm / 2, origin_mm + (w - 0.5) * pixel_mm,
              origin_mm - pixel_mm / 2, origin_mm + (h - 0.5) * pixel_mm)
    ax.imshow(image, cmap="gray", origin="lower", extent=extent, aspect="equal")
    xs, zs = [extent[0], extent[1]], [extent[2], extent[3]]
    truths = {True: [], False: []}
    preds = []
    for _, r in rows.iterrows():
        name = NAMES[int(r["label"])]
        t = (r[f"true_{across}_mm"], r["true_z_mm"]) if r["in_truth"] else None
        p = (r[f"pred_{across}_mm"], r["pred_z_mm"]) if r["predicted"] else None
        t = t if t is not None and all(map(np.isfinite, t)) else None
        p = p if p is not None and all(map(np.isfinite, p)) else None
        if t is not None and p is not None:
            ax.plot([p[0], t[0]], [p[1], t[1]], color="yellow", lw=1.0, ls="--")
        if t is not None:
            truths[bool(r["identified"])].append((*t, name))
        if p is not None:
            preds.append((*p, name))
    for ok, colour in ((True, "#2ca02c"), (False, "#ff7f0e")):
        for x, z, _ in truths[ok]:
            ax.plot(x, z, marker="o", ms=8, mfc="none", mew=1.6, color=colour)
        for x, z, text in _grouped(truths[ok], pixel_mm):
            ax.annotate(text, (x, z), xytext=(-7, 0), textcoords="offset points", ha="right", va="center",
                        fontsize=7, color=colour)
    for x, z, _ in preds:
        ax.plot(x, z, marker="x", ms=7, mew=1.8, color="#d62728")
    for x, z, text in _grouped(preds, pixel_mm):
        ax.annotate(text, (x, z), xytext=(7, 0), textcoords="offset points", ha="left", va="center", fontsize=7,
                    color="#d62728", bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.6})
    for x, z, _ in truths[True] + truths[False] + preds:
        xs.append(x)
        zs.append(z)
    pad = 3 * pixel_mm
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_ylim(min(zs) - pad, max(zs) + pad)
    ax.set_xlabel(f"{across} (mm)")
    ax.set_ylabel("z (mm, along the spine)")
    ax.set_title(title)
    ax.grid(False)


def gallery(path: Path, case: dict, rows: pd.DataFrame, title: str) -> Path:
    """Sagittal (z, y) and coronal (z, x) views of one held-out case with true centroids (circles:
    green identified, orange not) and predicted ones (red crosses), each class named, dashed lines
    from each prediction to the truth of the same class; canonical mm axes. Tall views stand side
    by side, wide ones (a short field of view) one above the other."""
    sag = np.asarray(case["sagittal"], dtype=float).reshape(tuple(case["sagittal_shape"]))
    cor = np.asarray(case["coronal"], dtype=float).reshape(tuple(case["coronal_shape"]))
    pixel = float(case["pixel_mm"])
    aspects = []  # width / height of each view's shown area (image and every centroid)
    for image, across in ((sag, "y"), (cor, "x")):
        pts = np.concatenate([rows[[f"{k}_{across}_mm", f"{k}_z_mm"]].to_numpy(float) for k in ("true", "pred")])
        pts = pts[np.isfinite(pts).all(axis=1)]
        w, h = image.shape[1] * pixel, image.shape[0] * pixel
        if len(pts):
            w, h = max(w, float(np.ptp(pts[:, 0]))), max(h, float(np.ptp(pts[:, 1])))
        aspects.append((w + 6 * pixel) / max(h + 6 * pixel, 1e-6))
    wide = float(np.mean(aspects)) > 1.2
    with matplotlib.rc_context(STYLE):
        if wide:
            heights = [min(4.5, max(2.0, 8.0 / a)) for a in aspects]
            fig = _figure(9.5, sum(heights) + 1.6)
            left, right = fig.subplots(2, 1, height_ratios=heights)
        else:
            widths = [min(5.5, max(2.2, 5.2 * a)) for a in aspects]
            fig = _figure(max(7.5, sum(widths) + 1.6), 6.6)
            left, right = fig.subplots(1, 2, width_ratios=widths)
        _view(left, sag, pixel, float(case["origin_mm"]), rows, "y", "sagittal (z, y)")
        _view(right, cor, pixel, float(case["origin_mm"]), rows, "x", "coronal (z, x)")
        handles = [
            Line2D([], [], marker="o", mfc="none", color="#2ca02c", ls="", label="true centroid, identified"),
            Line2D([], [], marker="o", mfc="none", color="#ff7f0e", ls="", label="true centroid, not identified"),
            Line2D([], [], marker="x", color="#d62728", ls="", label="predicted centroid"),
            Line2D([], [], color="yellow", ls="--", label="prediction to truth (same class)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, facecolor="#eeeeee")
        fig.suptitle(title)
        return _save(fig, path)


def cost(path: Path, costs: list[dict]) -> Path:
    """Best error reached so far (mm) against cumulative compute (h), one line per study."""
    costs = [c for c in costs if np.isfinite(np.asarray(c["series"]["best_error_mm"], dtype=float)).any()] or costs
    units = {c["series"]["unit"] for c in costs}
    kinds = {c["series"]["error_kind"] for c in costs}
    with matplotlib.rc_context(STYLE):
        fig = _figure(6.5, 4.0)
        ax = fig.add_subplot()
        for c in costs:
            s = c["series"]
            label = c["study"] if len(units) == 1 else f"{c['study']} ({s['unit']})"
            ax.step(s["compute"], s["best_error_mm"], where="post", marker="o", ms=3, label=label)
        ax.set_xlabel(f"cumulative compute ({units.pop() if len(units) == 1 else 'hours, see legend'})")
        ax.set_ylabel(f"best {'/'.join(sorted(kinds))} loc. error so far (mm)")
        ax.set_title("best error reached against compute spent")
        ax.legend(loc="best", title="study")
        return _save(fig, path)


def learning(path: Path, runs: list[dict], target: float = 0.85) -> Path:
    """Whole-CT validation identification rate (%) against training minutes (the whole-CT
    validations left out) of one or more ``vertstudy bench learn`` runs, one line each, with the
    ``target`` rate dashed and each run's first minute at it marked. ``runs``: bench learn's
    figures (``val_ct_curve``: ``[epoch, training minutes, id rate in 0-1]`` per evaluation;
    ``train_seed``, ``phantom_seed``, ``config`` and the held-out ``test_id_rate`` /
    ``test_loc_error_mm`` name the line when present)."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(7.0, 4.2)
        ax = fig.subplots()
        for run in runs:
            curve = np.asarray(run.get("val_ct_curve") or [], dtype=float).reshape(-1, 3)
            label = f"train seed {run.get('train_seed', '?')}, phantom seed {run.get('phantom_seed', '?')}"
            rate, error = run.get("test_id_rate"), run.get("test_loc_error_mm")
            if isinstance(rate, (int, float)) and math.isfinite(rate):
                label += f": held out {100 * rate:.1f} %"
                label += f" / {error:.2f} mm" if isinstance(error, (int, float)) and math.isfinite(error) else ""
            (line,) = ax.plot(curve[:, 1], 100 * curve[:, 2], marker="o", ms=2.5, lw=1.2, label=label)
            reached = curve[curve[:, 2] >= target]
            if len(reached):
                ax.plot(reached[0, 1], 100 * reached[0, 2], marker="*", ms=11, color=line.get_color(), zorder=3)
        ax.axhline(100 * target, ls="--", lw=1, color=BASELINE, label=f"{100 * target:.0f} % (star: first reached)")
        ax.set_xlabel("training minutes (whole-CT validations left out)")
        ax.set_ylabel("validation id. rate, whole CTs (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(left=0)
        ax.legend(loc="lower right")
        configs = sorted({str(r["config"]) for r in runs if r.get("config")})
        title = "bench learn: whole-CT validation during training"
        ax.set_title(title + (f"\n{configs[0]}" if len(configs) == 1 else ""))
        return _save(fig, path)
