"""The case view renderer: a valid PNG of the expected size, atomically written."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from vertstudy.data.phantom import PhantomConfig, generate_case
from vertstudy.data.show import curved_slab, render_case_views, show_case


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _spine_volume() -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) HU volume with bright blocks along a tilted line, and their (z, y, x) centres."""
    vol = np.full((80, 40, 50), -1000.0, dtype=np.float32)
    vol[:, 5:35, 5:45] = 40.0
    centres = []
    for k in range(6, 80, 12):
        y, x = 15 + k // 10, 25 - k // 16
        vol[k - 4:k + 4, y - 4:y + 4, x - 5:x + 5] = 250.0
        centres.append((k, y, x))
    return vol, np.array(centres, dtype=float)


def test_render_writes_png_of_expected_size(tmp_path):
    vol, pts = _spine_volume()
    names = [f"L{i + 1}" for i in range(len(pts))]
    out = render_case_views(vol, (2.0, 1.0, 1.0), pts, names, tmp_path / "sub" / "v.png", title="t",
                            truth_zyx_vox=pts + 0.5, truth_names=names)
    assert out == tmp_path / "sub" / "v.png"
    width, height = _png_size(out)
    assert width == 1200 and 600 <= height <= 2400
    assert [p.name for p in out.parent.iterdir()] == ["v.png"]  # no temporary file left


def test_render_z_scored_input_without_points_and_custom_width(tmp_path):
    vol, _ = _spine_volume()
    z = (vol - vol.mean()) / vol.std()
    out = render_case_views(z, (1.0, 1.0, 1.0), np.zeros((0, 3)), [], tmp_path / "z.png", width_px=800, mode="mip")
    assert _png_size(out)[0] == 800


def test_curved_slab_follows_the_track():
    vol = np.zeros((4, 3, 10), dtype=np.float32)
    for k in range(4):
        vol[k, :, 2 * k] = 1.0  # a bright line moving in x with z
    sag = curved_slab(vol, np.array([0.0, 2.0, 4.0, 6.0]), axis=2, half_vox=0)
    np.testing.assert_array_equal(sag, np.ones((4, 3)))
    assert curved_slab(vol, np.zeros(4), axis=2, half_vox=0)[1:].max() == 0.0


def test_show_a_flipped_phantom_written_as_files(tmp_path):
    from vertstudy.data.formats.verse import write_case

    case = generate_case(0, 0, PhantomConfig(p_flipped=1.0, p_fov_short=1.0, p_fov_full=0.0))
    assert case.tags["direction"] == "flipped"
    image = next(p for p in write_case(case, tmp_path / "ct") if p.name.endswith(".nii.gz"))
    width, height = _png_size(show_case(image, tmp_path / "c.png"))
    assert width == 1200 and height >= 600


def test_render_rejects_a_2d_volume(tmp_path):
    with pytest.raises(ValueError, match="3-D"):
        render_case_views(np.zeros((4, 4)), (1, 1, 1), np.zeros((0, 3)), [], tmp_path / "x.png")


def test_show_case_from_written_files(tmp_path):
    pytest.importorskip("vertstudy.data.formats.csi2014")
    from vertstudy.data.phantom import write_phantoms
    from vertstudy.data.show import show_case

    paths = write_phantoms(tmp_path / "d", 1, 0, config=PhantomConfig.preset("coarse"), progress=False)
    image = next(p for p in paths if p.name.endswith(".nii.gz"))
    assert _png_size(show_case(image, tmp_path / "s.png"))[0] == 1200
