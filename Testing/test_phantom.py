"""Phantom glioma cohort generator: layout, labels, anatomy, contrasts, determinism, CLI."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from fdn_core.data import phantom
from fdn_core.data.phantom import generate_cohort
from fdn_core.errors import ConfigError, DataError
from fdn_core.labels import MODALITIES
from fdn_core.progress import Cancelled, Progress
from fdn_core.report.montage import draw_cohort_montage

TINY = (64, 64, 40)
NAMES = (*MODALITIES, "seg", "anat")


def _load(cohort: Path, case_id: str, name: str) -> nib.Nifti1Image:
    return nib.load(str(cohort / case_id / f"{case_id}_{name}.nii.gz"))


def _cohort_json(cohort: Path) -> dict:
    return json.loads((cohort / "cohort.json").read_text())


def test_layout_shapes_and_affine(tiny_cohort: Path) -> None:
    meta = _cohort_json(tiny_cohort)
    assert meta["n_cases"] == 6 and meta["seed"] == 1234 and meta["shape"] == list(TINY)
    assert meta["spacing"] == [3.75, 3.75, 3.875]  # the 240 x 240 x 155 mm field of view is kept
    assert meta["generator_version"] == phantom.GENERATOR_VERSION
    case_dirs = sorted(p.name for p in tiny_cohort.iterdir() if p.is_dir())
    assert case_dirs == [c["case_id"] for c in meta["cases"]]
    for case in meta["cases"]:
        cid = case["case_id"]
        assert sorted(p.name for p in (tiny_cohort / cid).iterdir()) == sorted(
            f"{cid}_{n}.nii.gz" for n in NAMES
        )
        for name in NAMES:
            img = _load(tiny_cohort, cid, name)
            assert img.shape == TINY
            assert img.get_data_dtype() == (np.uint8 if name in ("seg", "anat") else np.int16)
            # BraTS-like LPS voxel axes: readers must reorient.
            np.testing.assert_allclose(img.affine, np.array(meta["affine"]), atol=1e-5)
            assert img.affine[0, 0] < 0 and img.affine[1, 1] < 0 and img.affine[2, 2] > 0
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")


def test_cohort_json_matches_files(tiny_cohort: Path) -> None:
    meta = _cohort_json(tiny_cohort)
    voxel_ml = float(np.prod(meta["spacing"])) / 1000.0
    assert meta["n_healthy"] == sum(c["healthy"] for c in meta["cases"])
    assert meta["seg_labels"] == {"1": "NCR/NET", "2": "ED", "4": "ET"}
    for case in meta["cases"]:
        seg = np.asanyarray(_load(tiny_cohort, case["case_id"], "seg").dataobj)
        vols = case["tumour_volume_ml"]
        for key, code in (("ncr_net", 1), ("ed", 2), ("et", 4)):
            assert vols[key] == pytest.approx(np.count_nonzero(seg == code) * voxel_ml, abs=1e-3)
        assert vols["total"] == pytest.approx(np.count_nonzero(seg) * voxel_ml, abs=1e-3)
        assert case["n_lesions"] == len(case["lesions"])
        assert (case["n_lesions"] == 0) == case["healthy"] == (case["pattern"] is None)
        affine = np.array(meta["affine"])
        for lesion in case["lesions"]:
            centre = np.array(lesion["centre_voxel"])
            np.testing.assert_allclose(
                affine[:3, :3] @ centre + affine[:3, 3], lesion["centre_mm"], atol=0.02
            )
            i, j, k = np.rint(centre).astype(int)
            assert np.isin(seg[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2], (1, 4)).any()
            assert lesion["pattern"] in phantom.PATTERNS
            assert lesion["target_ml"]["total"] == pytest.approx(
                sum(lesion["target_ml"][key] for key in ("ncr_net", "ed", "et")), abs=2e-3
            )
        if not case["healthy"]:
            assert case["pattern"] == case["lesions"][0]["pattern"]
            for key in ("ncr_net", "ed", "et", "total"):
                summed = sum(lesion["volume_ml"][key] for lesion in case["lesions"])
                assert vols[key] == pytest.approx(summed, abs=1e-2)
                assert case["tumour_target_ml"][key] == pytest.approx(
                    sum(lesion["target_ml"][key] for lesion in case["lesions"]), abs=2e-3
                )
        anatomy = case["anatomy"]
        assert set(anatomy) == {
            "head_scale",
            "scale",
            "tilt_deg",
            "shift_mm",
            "warp_mm",
            "ventricle_factor",
            "atrophy",
        }
        assert set(anatomy["tilt_deg"]) == {"pitch", "roll", "yaw"}
        assert set(case["contrast"]) == set(MODALITIES)
        for profile in case["contrast"].values():
            assert {"csf", "gm", "wm", "ed", "bias_sd", "noise", "slice_thickness_mm", "gain"} <= set(profile)


def test_labels_background_and_tumour_location(tiny_cohort: Path) -> None:
    meta = _cohort_json(tiny_cohort)
    healthy = [c for c in meta["cases"] if c["healthy"]]
    sick = [c for c in meta["cases"] if not c["healthy"]]
    assert len(healthy) >= 1 and len(sick) >= 2
    for case in meta["cases"]:
        cid = case["case_id"]
        seg = np.asanyarray(_load(tiny_cohort, cid, "seg").dataobj)
        anat = np.asanyarray(_load(tiny_cohort, cid, "anat").dataobj)
        images = [np.asanyarray(_load(tiny_cohort, cid, m).dataobj) for m in MODALITIES]
        brain = images[0] > 0
        for image in images[1:]:
            assert np.array_equal(image > 0, brain)  # one skull-stripped mask, background exactly 0
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert set(np.unique(anat)) == set(range(7))  # every structure present, plus background
        assert not np.any(seg[~brain]) and not np.any(anat[~brain])
        tumour = seg > 0
        if case["healthy"]:
            assert not tumour.any()
        else:
            assert tumour.any()
            assert np.isin(anat[tumour], (1, 2)).all()  # cerebrum only: never cerebellum or ventricle
        # The head fits the field of view in-plane; only the axial coverage may cut the brain.
        assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any()


def test_left_right_after_reorientation(tiny_cohort: Path) -> None:
    meta = _cohort_json(tiny_cohort)
    for case in meta["cases"]:
        img = nib.as_closest_canonical(_load(tiny_cohort, case["case_id"], "anat"))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        anat = np.asanyarray(img.dataobj)
        x = np.arange(anat.shape[0])[:, None, None] * np.ones(anat.shape)
        # Canonical voxel axis 0 runs from the subject's left to right: left labels have smaller indices.
        centre = anat.shape[0] / 2.0
        for left, right in ((1, 2), (3, 4), (5, 6)):
            assert x[anat == left].mean() < centre < x[anat == right].mean()
        # Cerebellum is inferior and posterior to the ventricles.
        y = np.arange(anat.shape[1])[None, :, None] * np.ones(anat.shape)
        z = np.arange(anat.shape[2])[None, None, :] * np.ones(anat.shape)
        cerebellum, ventricles = np.isin(anat, (3, 4)), np.isin(anat, (5, 6))
        assert z[cerebellum].mean() < z[ventricles].mean() and y[cerebellum].mean() < y[ventricles].mean()


def test_same_seed_same_bytes_any_worker_count(tiny_cohort: Path, tmp_path: Path) -> None:
    # Two worker processes, fewer cases: case i must still be byte-identical (RNG per (seed, case)).
    out = tmp_path / "again"
    calls: list[tuple[int, int, str]] = []
    progress = Progress(callback=lambda done, total, message: calls.append((done, total, message)))
    meta = generate_cohort(out, n_cases=2, seed=1234, shape=TINY, workers=2, progress=progress)
    assert calls[0][:2] == (0, 2) and calls[-1][:2] == (2, 2)
    assert meta["cases"] == _cohort_json(tiny_cohort)["cases"][:2]
    for case in meta["cases"]:
        for name in NAMES:
            rel = f"{case['case_id']}/{case['case_id']}_{name}.nii.gz"
            assert (out / rel).read_bytes() == (tiny_cohort / rel).read_bytes(), rel
    other = generate_cohort(tmp_path / "other", n_cases=1, seed=1235, shape=TINY, workers=1)
    rel = f"{other['cases'][0]['case_id']}/{other['cases'][0]['case_id']}_t1.nii.gz"
    assert (tmp_path / "other" / rel).read_bytes() != (tiny_cohort / rel).read_bytes()


def test_healthy_and_tumour_cases_guaranteed() -> None:
    for seed in range(200):
        flags = [phantom._is_healthy(seed, i) for i in range(8)]
        assert sum(flags[:4]) == 1 and sum(flags) == 2  # one healthy case in every block of four


def test_shape_scales_the_voxels_not_the_head() -> None:
    small = phantom._render_case(phantom._case_params(5, 1, (48, 48, 31)))
    large = phantom._render_case(phantom._case_params(5, 1, (96, 96, 62)))
    assert small.summary["brain_volume_ml"] == pytest.approx(large.summary["brain_volume_ml"], rel=0.05)
    for key, value in large.summary["anat_volume_ml"].items():
        assert small.summary["anat_volume_ml"][key] == pytest.approx(value, rel=0.25), key


def _pattern_cases(pattern: str, shape: tuple[int, int, int], count: int = 1) -> list[phantom._CaseParams]:
    """The first ``count`` single-lesion cases of ``pattern`` (seed 11)."""
    found = []
    for index in range(200):
        params = phantom._case_params(11, index, shape)
        if len(params.lesions) == 1 and params.lesions[0].pattern == pattern:
            found.append(params)
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} {pattern} cases among 200")


def test_tissue_contrasts_have_the_right_order() -> None:
    # Three ring cases, i.e. three scanner/protocol profiles: every sequence stays recognisable.
    for params in _pattern_cases("ring", (120, 120, 78), count=3):
        rendered = phantom._render_case(params)
        tissue, seg = rendered.tissue, rendered.seg
        normal = seg == 0

        def mean(name: str, where: np.ndarray, rendered: phantom._Rendered = rendered) -> float:
            return float(rendered.images[name][where].mean())

        csf, gm, wm = ((tissue == k) & normal for k in (1, 2, 3))
        assert mean("t1", wm) > mean("t1", gm) > mean("t1", csf)
        assert mean("t1ce", wm) > mean("t1ce", gm) > mean("t1ce", csf)
        assert mean("t2", csf) > mean("t2", gm) > mean("t2", wm)
        assert mean("flair", gm) > mean("flair", wm) > mean("flair", csf)
        assert mean("t1ce", seg == 4) > mean("t1ce", wm) > mean("t1ce", seg == 1)  # rim bright, necrosis dark
        assert mean("flair", seg == 2) > mean("flair", gm)  # oedema bright
        assert mean("t2", seg == 2) > mean("t2", wm) and mean("t2", seg == 1) > mean("t2", gm)


def test_contrast_profiles_vary_but_keep_every_rule() -> None:
    rng = np.random.default_rng(0)
    profiles = [phantom._draw_contrast(rng) for _ in range(300)]
    assert all(phantom._contrast_ok(c.table) for c in profiles)
    assert not any(c.table is phantom._INTENSITY for c in profiles)  # the fallback table was never needed
    tables = np.stack([c.table for c in profiles])
    assert float(np.std(np.log(tables[:, 0, 2] / tables[:, 0, 1]))) > 0.05  # T1 WM/GM contrast varies
    thickness = np.stack([c.slice_thickness_mm for c in profiles])
    assert thickness[:, 2:].max() > 4.5 and thickness[:, :2].max() < 3.0  # thick 2D T2/FLAIR, thin 3D T1
    bias = np.stack([c.bias_sd for c in profiles])
    assert bias.max() > 4 * bias.min()


def test_whole_tumour_volume_sampler_matches_the_published_figures() -> None:
    ref = phantom.BRATS_WT_REFERENCE
    volumes = phantom.sample_whole_tumour_ml(np.random.default_rng(5), 20000)
    q1, median, q3 = np.percentile(volumes, [25, 50, 75])
    assert float(volumes.mean()) == pytest.approx(ref["mean"], rel=0.05)
    assert float(median) == pytest.approx(ref["median"], rel=0.05)
    assert float(q3 - q1) == pytest.approx(ref["iqr"], rel=0.05)
    assert float(volumes.std()) == pytest.approx(ref["sd"], rel=0.05)
    assert float(np.mean(volumes > 150.0)) == pytest.approx(ref["fraction_over_150"], abs=0.02)
    assert volumes.min() >= ref["min"] and volumes.max() <= phantom.WT_VOLUME_MODEL["max_ml"]


def test_case_targets_follow_the_volume_model_and_pattern_mix() -> None:
    totals, patterns, oedema_largest, n_enhancing = [], [], 0, 0
    for index in range(400):
        params = phantom._case_params(17, index, (64, 64, 40))
        if params.healthy:
            assert not params.lesions
            continue
        totals.append(sum(les.target_ml["total"] for les in params.lesions))
        patterns.append(params.lesions[0].pattern)
        for les in params.lesions:
            t = les.target_ml
            assert t["ncr_net"] >= 0 and t["ed"] > 0 and t["et"] >= 0
            if les.pattern == "non-enhancing":
                assert t["et"] == 0
            elif les.pattern == "solid":
                assert t["ncr_net"] == 0 and t["et"] > 0
            else:
                assert t["ncr_net"] > 0 and t["et"] > 0
        if params.lesions[0].pattern != "non-enhancing":
            n_enhancing += 1
            t = params.lesions[0].target_ml
            oedema_largest += t["ed"] > max(t["ncr_net"], t["et"])
    assert len(totals) == 300  # one healthy case in every four
    ref = phantom.BRATS_WT_REFERENCE
    assert float(np.mean(totals)) == pytest.approx(ref["mean"], rel=0.1)
    assert float(np.median(totals)) == pytest.approx(ref["median"], rel=0.12)
    for pattern, probability in phantom.PATTERNS.items():
        assert patterns.count(pattern) / len(patterns) == pytest.approx(probability, abs=0.08), pattern
    assert oedema_largest / n_enhancing > 0.8  # oedema is usually the largest sub-region


@pytest.mark.parametrize("pattern", sorted(phantom.PATTERNS))
def test_patterns_render_their_labels_at_their_target_volumes(pattern: str) -> None:
    shape = (120, 120, 78)
    voxel_ml = float(np.prod(phantom._spacing(shape))) / 1000.0
    params = _pattern_cases(pattern, shape)[0]
    rendered = phantom._render_case(params)
    seg, summary = rendered.seg, rendered.summary
    labels = set(np.unique(seg)) - {0}
    assert labels == {"ring": {1, 2, 4}, "solid": {2, 4}, "non-enhancing": {1, 2}}[pattern]
    target, actual = summary["tumour_target_ml"], summary["tumour_volume_ml"]
    # Rank-sized regions: whole tumour and core exact to a voxel; a ring's necrosis may fall short where the
    # core is too thin for a rim (2 mm voxels here).
    assert actual["total"] == pytest.approx(target["total"], abs=2 * voxel_ml)
    core = actual["ncr_net"] + actual["et"]
    assert core == pytest.approx(target["ncr_net"] + target["et"], abs=2 * voxel_ml)
    if pattern == "ring":
        assert actual["ncr_net"] >= 0.5 * target["ncr_net"]
        necrosis = seg == 1
        shell = ndi.binary_dilation(necrosis) & ~necrosis
        assert np.isin(seg[shell], (1, 4)).all()  # necrosis enclosed by the enhancing rim
    anat = rendered.anat
    assert np.isin(anat[seg > 0], (1, 2)).all()
    assert len({int(v) for v in np.unique(anat[seg > 0])}) == 1  # one hemisphere (single lesion)


def test_full_size_case_meets_its_targets() -> None:
    params = _pattern_cases("ring", phantom.DEFAULT_SHAPE)[0]
    rendered = phantom._render_case(params)
    target, actual = rendered.summary["tumour_target_ml"], rendered.summary["tumour_volume_ml"]
    for key in ("ncr_net", "ed", "et", "total"):
        assert actual[key] == pytest.approx(target[key], rel=0.01, abs=0.01), key
    assert set(np.unique(rendered.anat)) == set(range(7))
    assert set(np.unique(rendered.seg)) == {0, 1, 2, 4}


def test_anatomical_variety() -> None:
    params = [phantom._case_params(23, index, (96, 96, 62)) for index in range(60)]
    tilts = np.stack([p.tilt_deg for p in params])
    assert (np.abs(tilts) > 5.0).any(axis=0).all()  # several degrees of pitch, roll and yaw
    heads = np.array([float(np.prod(p.scale) ** (1 / 3)) for p in params])
    assert heads.max() / heads.min() > 1.1
    factors = np.array([p.ventricle_factor for p in params])
    assert factors.min() < 0.9 and factors.max() > 1.6
    assert max(p.atrophy for p in params) > 0.5 and min(p.atrophy for p in params) < 0.1
    # Ventricle size and atrophy act as intended on one case (same deformation, contrast and noise).
    base = dataclasses.replace(params[0], lesions=(), healthy=True)

    def volumes(**changes: float) -> dict[str, float]:
        summary = phantom._render_case(dataclasses.replace(base, **changes)).summary
        ventricles = (
            summary["anat_volume_ml"]["L_lateral_ventricle"]
            + summary["anat_volume_ml"]["R_lateral_ventricle"]
        )
        return {"ventricles": ventricles, "parenchyma": summary["parenchyma_volume_ml"]}

    small = volumes(ventricle_dilation_mm=phantom._ventricle_dilation(0.8), atrophy=0.0)
    large = volumes(ventricle_dilation_mm=phantom._ventricle_dilation(2.0), atrophy=0.0)
    assert large["ventricles"] / small["ventricles"] == pytest.approx(2.0 / 0.8, rel=0.25)
    atrophied = volumes(ventricle_dilation_mm=phantom._ventricle_dilation(0.8), atrophy=0.8)
    assert atrophied["parenchyma"] < 0.95 * small["parenchyma"]


def test_mass_effect_pushes_the_ventricle_away() -> None:
    base = phantom._case_params(3, 0, (120, 120, 78))
    core_ml = 4.0 / 3.0 * np.pi * 13.0**3 / 1000.0 * float(np.prod(base.scale))  # a 13 mm core in MNI mm
    lesion = phantom._Lesion(
        pattern="ring",
        target_ml={
            "ncr_net": 0.4 * core_ml,
            "ed": 4.0 * core_ml,
            "et": 0.6 * core_ml,
            "total": 5.0 * core_ml,
        },
        centre=np.array([-36.0, -12.0, 18.0]),  # corona radiata, lateral to the left ventricle body
        shape_axes=np.ones(3),
        rotation=np.eye(3),
        irregularity=0.15,
        rim_variation_mm=1.5,
        push_fraction=0.6,
        swelling=0.5,
        push_decay_mm=25.0,
        noise_seed=7,
    )
    # The same case (same deformation, contrasts, noise) rendered with and without the lesion.
    with_tumour = phantom._render_case(dataclasses.replace(base, healthy=False, lesions=(lesion,)))
    without = phantom._render_case(dataclasses.replace(base, healthy=True, lesions=()))
    assert not without.seg.any() and with_tumour.seg.any()
    affine = with_tumour.affine
    centre_mm = np.array(with_tumour.summary["lesions"][0]["centre_mm"])

    def ventricle(rendered: phantom._Rendered, label: int) -> tuple[float, float, int]:
        world = np.argwhere(rendered.anat == label) @ affine[:3, :3].T + affine[:3, 3]
        distances = np.linalg.norm(world - centre_mm, axis=1)
        return float(np.linalg.norm(world.mean(axis=0) - centre_mm)), float(distances.min()), len(world)

    centroid_with, nearest_with, volume_with = ventricle(with_tumour, 5)
    centroid_without, nearest_without, volume_without = ventricle(without, 5)
    assert centroid_with > centroid_without + 0.5  # the left ventricle moved away from the tumour
    assert nearest_with > nearest_without + 2.0  # most of all its wall facing the tumour
    assert 0.8 < volume_with / volume_without < 1.2  # displaced, not destroyed
    # The contralateral ventricle moves away too, but less.
    shift_right = ventricle(with_tumour, 6)[0] - ventricle(without, 6)[0]
    assert 0.0 < shift_right < centroid_with - centroid_without


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_cases"):
        generate_cohort(tmp_path / "a", n_cases=0, seed=1)
    with pytest.raises(ConfigError, match="seed"):
        generate_cohort(tmp_path / "a", n_cases=1, seed=-3)
    with pytest.raises(ConfigError, match="shape"):
        generate_cohort(tmp_path / "a", n_cases=1, seed=1, shape=(8, 8, 8))
    with pytest.raises(ConfigError, match="shape"):
        generate_cohort(tmp_path / "a", n_cases=1, seed=1, shape=(64, 64))
    with pytest.raises(ConfigError, match="workers"):
        generate_cohort(tmp_path / "a", n_cases=1, seed=1, workers=0)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        generate_cohort(a_file, n_cases=1, seed=1, shape=(32, 32, 20))
    assert not (tmp_path / "a").exists()


def test_cancel_leaves_nothing_behind(tmp_path: Path) -> None:
    progress = Progress()

    def cancel_after_first_case(done: int, total: int, message: str) -> None:
        if done == 1:
            progress.cancel.set()

    progress.callback = cancel_after_first_case
    with pytest.raises(Cancelled):
        generate_cohort(
            tmp_path / "cohort", n_cases=3, seed=1, shape=(32, 32, 20), workers=1, progress=progress
        )
    assert list(tmp_path.iterdir()) == []  # the half-built cohort was removed, nothing was renamed into place


def test_missing_nilearn_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nilearn", None)
    with pytest.raises(DataError, match="pip install nilearn"):
        phantom._nilearn_datasets()


def test_cli_refuses_non_empty_folder_then_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fdn_core.cli import main

    out = tmp_path / "cohort"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["phantom", "--out", str(out), "--cases", "1", "--seed", "4", "--shape", "32", "32", "20"]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main([*argv, "--workers", "1", "--overwrite"]) == 0
    summary = capsys.readouterr().out
    assert "1 cases" in summary and "healthy" in summary
    assert not (out / "keep.txt").exists() and (out / "cohort.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]  # no temporary folder left behind


def test_montage(tiny_cohort: Path, tmp_path: Path) -> None:
    png = draw_cohort_montage(tiny_cohort, tmp_path / "m.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 400_000
    with pytest.raises(DataError, match="no case"):
        draw_cohort_montage(tiny_cohort, tmp_path / "n.png", cases=["nobody"])
    with pytest.raises(DataError, match=r"cohort\.json"):
        draw_cohort_montage(tmp_path, tmp_path / "n.png")


def test_demo_regenerates_a_cohort_of_another_generator_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fdn_core import demo

    settings = demo.DemoSettings(out=tmp_path, cases=8, seed=3, shape=(32, 32, 20))
    cohort_dir = tmp_path / "cohort"
    cohort_dir.mkdir()
    calls: list[int] = []

    def fake_generate(out_dir: Path, **kwargs: object) -> dict:
        calls.append(1)
        return {"generator_version": phantom.GENERATOR_VERSION}

    monkeypatch.setattr(phantom, "generate_cohort", fake_generate)
    meta = {"seed": 3, "shape": [32, 32, 20], "cases": [{}] * 8}
    for version, regenerated in (("1.0", True), (phantom.GENERATOR_VERSION, False)):
        (cohort_dir / "cohort.json").write_text(json.dumps({**meta, "generator_version": version}))
        calls.clear()
        demo._cohort(settings, None)
        assert bool(calls) == regenerated, version
