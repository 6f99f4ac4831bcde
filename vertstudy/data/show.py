"""Pictures of a case: a sagittal and a coronal view with labelled centroids (paper Fig. 8 style).

Input volume axes: 0 = body long axis, index increasing toward superior (+z LPS); 1 = y, index
increasing toward posterior; 2 = x, index increasing toward the patient's left. Points are
(z, y, x) continuous voxel indices of that volume. Views are drawn in millimetres with the head
up, anterior on the left of the sagittal view and the patient's right on the left of the coronal
view (radiological convention). Each view is a thick slab (mean over +-``slab_mm``) that follows
the spine: per row, centred on the points' position interpolated at that height, so a curved
spine stays in view. Predicted points are red, truth points blue, as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vertstudy.atomic import atomic_path

PRED_COLOUR = "#ff3030"
TRUTH_COLOUR = "#3080ff"
HU_WINDOW = (-300.0, 1300.0)  # bone-friendly window for HU volumes


def _window(images: list[np.ndarray]) -> tuple[float, float]:
    """Display range: a bone window for HU volumes, else robust percentiles (z-scored input)."""
    values = np.concatenate([im.ravel() for im in images])
    if values.min() < -500 or values.max() > 500:
        return HU_WINDOW
    lo, hi = np.percentile(values, [2.0, 99.7])
    return float(lo), float(max(hi, lo + 1e-6))


def _centre_track(n: int, points_zyx: np.ndarray, axis: int, default: float) -> np.ndarray:
    """(n,) slab centre (voxel index along ``axis``) per row z, interpolated from the points."""
    if len(points_zyx) == 0:
        return np.full(n, default)
    order = np.argsort(points_zyx[:, 0])
    z, c = points_zyx[order, 0], points_zyx[order, axis]
    if len(z) == 1:
        return np.full(n, c[0])
    return np.interp(np.arange(n), z, c)


def curved_slab(volume_zyx: np.ndarray, track: np.ndarray, axis: int, half_vox: int, mode: str = "mean") -> np.ndarray:
    """Thick slab through ``volume_zyx`` (z, y, x) across ``axis`` (1 = coronal, 2 = sagittal),
    centred per row z at ``track[z]`` (voxels), ``half_vox`` voxels either side.

    Returns (z, other axis) float32: the mean (or ``mode="mip"``: maximum) over the slab.
    """
    nz, size = volume_zyx.shape[0], volume_zyx.shape[axis]
    out = np.empty((nz, volume_zyx.shape[3 - axis]), dtype=np.float32)
    for k in range(nz):
        c = int(round(float(np.clip(track[k], 0, size - 1))))
        lo, hi = max(c - half_vox, 0), min(c + half_vox + 1, size)
        plane = volume_zyx[k, :, lo:hi] if axis == 2 else volume_zyx[k, lo:hi, :]
        plane = plane.astype(np.float32, copy=False)
        out[k] = plane.max(axis=axis - 1) if mode == "mip" else plane.mean(axis=axis - 1)
    return out


def _default_centre(volume_zyx: np.ndarray) -> tuple[float, float]:
    """(y, x) voxel position of the spine when no points are given: the densest column."""
    proj = (volume_zyx > np.percentile(volume_zyx, 99)).sum(axis=0).astype(np.float32)
    if proj.max() == 0:
        return (volume_zyx.shape[1] - 1) / 2, (volume_zyx.shape[2] - 1) / 2
    j, i = np.unravel_index(int(np.argmax(proj)), proj.shape)
    return float(j), float(i)


def _mark(ax, xs, ys, names, colour, dx: float, y_max: float) -> None:
    keep = (ys >= 0) & (ys <= y_max)  # points beyond the volume's ends are not drawn
    xs, ys, names = xs[keep], ys[keep], [n for n, k in zip(names, keep) if k]
    ax.scatter(xs, ys, marker="+", s=70, linewidths=1.6, c=colour, zorder=3)
    for x, y, name in zip(xs, ys, names):
        ax.text(x + dx, y, name, color=colour, fontsize=7, va="center", ha="left" if dx > 0 else "right",
                zorder=4, fontweight="bold")


def render_case_views(
    volume_zyx: np.ndarray,
    spacing_zyx_mm: tuple[float, float, float],
    points_zyx_vox: np.ndarray,
    names: list[str],
    out_png: Path,
    title: str = "",
    truth_zyx_vox: np.ndarray | None = None,
    truth_names: list[str] | None = None,
    slab_mm: float = 15.0,
    mode: str = "mean",
    width_px: int = 1200,
) -> Path:
    """Write a PNG with a sagittal (left) and a coronal (right) view of the case.

    Args:
        volume_zyx: (z, y, x) HU or z-scored values; axis 0 toward superior, 1 toward posterior,
            2 toward the patient's left.
        spacing_zyx_mm: voxel size along (z, y, x), mm.
        points_zyx_vox: (N, 3) centroids (predicted, or the case's own), continuous voxel index.
        names: N labels, drawn next to the crosses (red).
        out_png: output path; written atomically (temporary file, then rename).
        title: figure title.
        truth_zyx_vox, truth_names: optional truth centroids, drawn in blue.
        slab_mm: half thickness of the slab (mm) around the spine.
        mode: ``"mean"`` or ``"mip"`` over the slab.
        width_px: image width in pixels; the height follows the volume's aspect (600-2400 px).

    Returns ``out_png``.
    """
    vol = np.asarray(volume_zyx)
    if vol.ndim != 3:
        raise ValueError(f"volume_zyx must be 3-D (z, y, x), got shape {vol.shape}")
    sz, sy, sx = (float(s) for s in spacing_zyx_mm)
    pts = np.asarray(points_zyx_vox, dtype=np.float64).reshape(-1, 3)
    truth = None if truth_zyx_vox is None else np.asarray(truth_zyx_vox, dtype=np.float64).reshape(-1, 3)
    track_pts = pts if len(pts) else (truth if truth is not None else pts)
    cy, cx = _default_centre(vol) if len(track_pts) == 0 else (np.median(track_pts[:, 1]), np.median(track_pts[:, 2]))
    nz = vol.shape[0]
    sag = curved_slab(vol, _centre_track(nz, track_pts, 2, cx), 2, max(int(round(slab_mm / sx)), 0), mode)
    cor = curved_slab(vol, _centre_track(nz, track_pts, 1, cy), 1, max(int(round(slab_mm / sy)), 0), mode)
    vmin, vmax = _window([sag, cor])

    height_mm = nz * sz
    widths = (vol.shape[1] * sy, vol.shape[2] * sx)
    fig_w = width_px / 100.0
    panel_w = fig_w * 0.46
    fig_h = float(np.clip(panel_w * height_mm / max(widths) + 0.6, 6.0, 24.0))
    fig = Figure(figsize=(fig_w, fig_h), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    views = (
        ("sagittal", sag, sy, 1, (0.02, 0.02, 0.46, 0.92)),
        ("coronal", cor, sx, 2, (0.52, 0.02, 0.46, 0.92)),
    )
    for label, image, step, axis, rect in views:
        ax = fig.add_axes(rect)
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="bilinear",
                  extent=(-0.5 * step, (image.shape[1] - 0.5) * step, -0.5 * sz, (nz - 0.5) * sz), aspect="equal")
        ax.set_axis_off()
        ax.set_title(label, color="white", fontsize=9)
        if truth is not None and len(truth):
            _mark(ax, truth[:, axis] * step, truth[:, 0] * sz, truth_names or [""] * len(truth), TRUTH_COLOUR, -4.0,
                  nz * sz)
        if len(pts):
            _mark(ax, pts[:, axis] * step, pts[:, 0] * sz, names, PRED_COLOUR, 4.0, nz * sz)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", facecolor="black")
    return out_png


def show_case(
    case: Path, out_png: Path, landmarks: Path | None = None, prep=None, title: str | None = None
) -> Path:
    """Render a case given by path: an image file or DICOM folder (with its centroid file found
    beside it, or ``landmarks``), or a preprocessing cache entry folder (``meta.json`` +
    ``volume.npy``).

    Files are preprocessed with ``prep`` (:class:`~vertstudy.config.PrepConfig`: canonical
    orientation, isotropic ``spacing_mm``) for display and shown in HU; a cache entry is shown as
    stored, back in HU when its metadata has the z-score statistics.
    """
    from vertstudy.config import PrepConfig
    from vertstudy.data.preprocess import preprocess

    case = Path(case)
    if case.is_dir() and (case / "meta.json").is_file() and (case / "volume.npy").is_file():
        import json

        from vertstudy.data.cache import load_entry

        entry = load_entry(case)
        volume = np.asarray(entry.volume(), dtype=np.float32)
        meta = json.loads((case / "meta.json").read_text(encoding="utf-8"))
        if "hu_mean" in meta and "hu_std" in meta:  # back to HU for the bone window
            volume = volume * np.float32(meta["hu_std"]) + np.float32(meta["hu_mean"])
        spacing = (entry.geometry.spacing_mm,) * 3
        head = title if title is not None else f"{entry.case_id} (cache entry {entry.key[:12]})"
        return render_case_views(volume, spacing, entry.zyx_vox, entry.labels, out_png, head)
    from vertstudy.data.formats import read_any

    loaded = read_any(case, landmarks)
    prepared = preprocess(loaded, prep or PrepConfig())
    volume_hu = prepared.volume * np.float32(prepared.hu_std) + np.float32(prepared.hu_mean)
    if title is None:
        keys = ("fov", "metal", "curvature", "noise", "spacing")
        title = " ".join([loaded.case_id, *(f"{k}={loaded.tags[k]}" for k in keys if k in loaded.tags)])
    spacing = (prepared.geometry.spacing_mm,) * 3
    return render_case_views(volume_hu, spacing, prepared.zyx_vox, loaded.labels(), out_png, title)
