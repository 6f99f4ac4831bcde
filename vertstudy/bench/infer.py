"""``vertstudy bench infer``: seconds to label one whole CT, at the configured batch size and at 1.

One phantom CT (``coarse`` by default: ~108 x 108 x 243 voxels at ~2.2 x 2.2 x 2.7 mm; or
``clinical``) is generated and written to disk (not timed). Then it is read and preprocessed
once (timed: ``read_s``, ``prep_s``), and whole-CT inference (:mod:`vertstudy.infer`:
tiling, network, votes, K-means) runs on it with the configured ``infer.batch_size`` and with
batch 1, side by side in one run (alternating when ``repeats > 1``; the fastest of each is kept,
these machines are shared and noisy). A warm-up batch runs first, untimed.

The network is **untrained** (random weights of the given ``width``, the paper's architecture
otherwise): the time does not depend on the weights, but the threshold is set to 0 so every
class votes in every tile and the clustering does its full work, as for a confident model.
Batching must not change the result (GroupNorm is per sample): ``centroid_max_diff_vox`` is the
largest difference between the two runs' centroids.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vertstudy.bench import format_figures, work_folder
from vertstudy.config import Config, InferConfig


def _centroid_diff(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max((float(np.abs(a[k] - b[k]).max()) for k in a), default=0.0)


def bench_infer(
    width: float = 1.0,
    resolution: str = "coarse",
    batch_size: int | None = None,
    stride: tuple[int, int, int] | None = None,
    repeats: int = 1,
    seed: int = 0,
    workdir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Time whole-CT inference on one phantom; returns the figures (names carry units).

    Args:
        width: network width multiplier (``model.width``; 1.0 is the paper's network).
        resolution: phantom preset, ``coarse`` or ``clinical``.
        batch_size: the configured batch size (default ``InferConfig().batch_size``).
        stride: tile stride (z, y, x) voxels (default ``InferConfig().stride``).
        repeats: timed runs per batch size (alternating); the fastest is reported.
        seed: phantom seed (the case is index 0 with a full field of view) and weight seed.
        workdir: folder for the phantom (default: a temporary folder, removed).
        progress: print a line per timed run.
    """
    from vertstudy.data.formats.csi2014 import read_case as read_csi
    from vertstudy.data.formats.csi2014 import ref_for
    from vertstudy.data.phantom import PhantomConfig, write_phantoms
    from vertstudy.data.preprocess import preprocess
    from vertstudy.infer.tiling import tile_origins
    from vertstudy.model.network import build_model

    defaults = InferConfig()
    infer = InferConfig(
        stride=tuple(stride) if stride else defaults.stride,
        batch_size=batch_size or defaults.batch_size,
        threshold=1e-6,  # every class votes: the clustering's full load (see module doc)
        min_votes=1,
    )
    single = infer.model_copy(update={"batch_size": 1})
    cfg = Config.model_validate({"model": {"width": width}, "infer": infer.model_dump()})
    crop = tuple(int(c) for c in cfg.data.crop.crop_size)

    with work_folder(workdir, "vertstudy-bench-infer-") as work:
        phantom = PhantomConfig.preset(resolution, p_fov_full=1.0)
        paths = write_phantoms(work / "phantom", cases=1, seed=seed, fmt="csi2014", config=phantom, progress=False)
        image_path = next(p for p in paths if p.name.endswith((".nii.gz", ".nii")))

        t0 = time.perf_counter()
        case = read_csi(ref_for(image_path))
        t1 = time.perf_counter()
        prepared = preprocess(case, cfg.data.prep)
        t2 = time.perf_counter()
        read_s, prep_s = t1 - t0, t2 - t1

        torch.manual_seed(seed)
        model = build_model(cfg.model).eval()
        volume = prepared.volume
        tiles = len(tile_origins(volume.shape, crop, infer.stride))
        with torch.inference_mode():  # warm-up: allocator, kernels
            model(torch.zeros((1, 1, *crop)))

        best, results = _timed_runs(model, cfg, prepared, {"configured": infer, "batch1": single}, repeats, tiles,
                                    progress)
        return _figures(width, model, resolution, case, volume, crop, infer, tiles, read_s, prep_s, best, results,
                        repeats)


def _timed_runs(model, cfg: Config, prepared, runs: dict[str, InferConfig], repeats: int, tiles: int,
                progress: bool) -> tuple[dict[str, float], dict[str, dict[int, np.ndarray]]]:
    """``repeats`` alternating timed labellings of ``prepared`` per named inference setting: the
    fastest seconds of each, and each one's centroids ``{class: (z, y, x) voxels}``."""
    from vertstudy.infer.whole import predict_prepared

    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict[int, np.ndarray]] = {}
    for _ in range(repeats):
        for name, run_cfg in runs.items():
            start = time.perf_counter()
            prediction = predict_prepared(model, cfg, prepared, infer_cfg=run_cfg)
            times[name].append(time.perf_counter() - start)
            results[name] = {v.index: np.asarray(v.zyx_vox) for v in prediction.vertebrae}
            if progress:
                print(f"  {name} (batch {run_cfg.batch_size}): {times[name][-1]:.2f} s for {tiles} tiles")
    return {name: min(ts) for name, ts in times.items()}, results


def _figures(width, model, resolution, case, volume, crop, infer, tiles, read_s, prep_s, best, results,
             repeats) -> dict:
    """The figures of one run (names carry units)."""
    return {
        "model_width": width,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "weights": "untrained (random)",
        "phantom_resolution": resolution,
        "image_size_xyz": "x".join(str(s) for s in case.image.GetSize()),
        "image_spacing_xyz_mm": "x".join(f"{s:.2f}" for s in case.image.GetSpacing()),
        "canonical_shape_zyx": "x".join(str(s) for s in volume.shape),
        "crop_size_zyx": "x".join(str(c) for c in crop),
        "stride_zyx": "x".join(str(s) for s in infer.stride),
        "tiles": tiles,
        "torch_threads": torch.get_num_threads(),
        "batch_size": infer.batch_size,
        "read_s": read_s,
        "prep_s": prep_s,
        "infer_batch_s": best["configured"],
        "infer_batch1_s": best["batch1"],
        "batch1_to_batch_ratio": best["batch1"] / best["configured"],
        "label_ct_batch_s": read_s + prep_s + best["configured"],
        "label_ct_batch1_s": read_s + prep_s + best["batch1"],
        "tiles_per_s_batch": tiles / best["configured"],
        "tiles_per_s_batch1": tiles / best["batch1"],
        "centroid_max_diff_vox": _centroid_diff(results["configured"], results["batch1"]),
        "repeats": repeats,
    }


def format_table(figures: dict) -> str:
    return format_figures("vertstudy bench infer", figures)
