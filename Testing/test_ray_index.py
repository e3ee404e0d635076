"""``fdn index build|add --ray``: reading and encoding on Ray (fdn_core/ray_index.py).

The Ray test runs a local Ray of 2 CPUs (the ``ray`` extra, installed by the test extra; skipped cleanly
without it). The other tests need no Ray: the clear error without it, and the planning of the actors."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fdn_core.cli import main
from fdn_core.errors import ConfigError


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------ without Ray


def test_without_ray_the_command_says_how_to_install_it(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    common = ["--model", str(tmp_path / "no-model"), "--data", str(tiny_cohort), "--db", str(tmp_path / "db")]
    rc, _, err = _run(capsys, "index", "build", *common, "--ray", "--no-progress")
    assert rc == 2
    assert "--ray needs Ray" in err and "pip install 'fdn-retrieval[ray]'" in err, err
    assert "Traceback" not in err and not (tmp_path / "db").exists()
    rc, _, err = _run(capsys, "index", "add", *common, "--ray", "auto")
    assert rc == 2 and "pip install 'fdn-retrieval[ray]'" in err
    rc, _, err = _run(capsys, "index", "build", *common, "--ray-workers", "2")
    assert rc == 2 and "--ray-workers and --ray-cpus need --ray" in err


class _FakeRay:
    def __init__(self, cpus: float, gpus: int = 0) -> None:
        self.res = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    def cluster_resources(self) -> dict[str, float]:
        return dict(self.res)


def test_the_encoders_fit_the_cluster() -> None:
    from fdn_core.ray_index import RayEncoder

    assert RayEncoder()._plan(_FakeRay(2)) == (1, False)  # 1 CPU encoder, 1 CPU left for reading
    assert RayEncoder()._plan(_FakeRay(64)) == (32, False)
    assert RayEncoder()._plan(_FakeRay(32, gpus=4)) == (4, True)  # one actor per GPU
    assert RayEncoder(device="cpu")._plan(_FakeRay(32, gpus=4)) == (16, False)
    assert RayEncoder(device="cuda:1", workers=2)._plan(_FakeRay(8, gpus=2)) == (2, True)
    with pytest.raises(ConfigError, match="need 3 CPUs, but the Ray cluster has 2"):
        RayEncoder(workers=2)._plan(_FakeRay(2))
    with pytest.raises(ConfigError, match="has no GPU"):
        RayEncoder(device="cuda")._plan(_FakeRay(8))
    with pytest.raises(ConfigError, match="3 GPU encoders"):
        RayEncoder(workers=3)._plan(_FakeRay(8, gpus=2))
    with pytest.raises(ConfigError, match=r"auto .* cuda or cpu"):
        RayEncoder(device="mps")


def test_workers_skip_what_the_database_holds_and_say_when_a_node_cannot_see_a_file(tmp_path: Path) -> None:
    from fdn_core.data.readers import CaseFiles
    from fdn_core.ray_index import _known, _with_storage_hint

    shas = sorted(bytes([i]) * 32 for i in (3, 1, 2))
    digests = np.array(shas, dtype="S32")
    assert _known(digests, (bytes([2]) * 32).hex()) and not _known(digests, (bytes([4]) * 32).hex())
    assert not _known(np.zeros(0, dtype="S32"), (bytes([2]) * 32).hex())
    here = tmp_path / "c1_t1.nii.gz"
    here.write_bytes(b"")
    f = CaseFiles("c1", "brats", {"t1": here}, None, None, None)
    text = _with_storage_hint(f, "no such file", f"node7\0{here}")
    assert text.startswith("case c1: no such file (node node7 cannot see") and "same absolute paths" in text
    assert _with_storage_hint(f, "case c1: gone", f"node7\0{tmp_path / 'nowhere'}") == "case c1: gone"


@pytest.mark.parametrize("case_id", ["phantom_0000", "phantom_0004"])  # a tumour, then a healthy brain
def test_a_ray_worker_flags_an_unlabelled_case_as_the_local_encoder_does(
    case_id: str, tiny_cohort: Path, tmp_path: Path
) -> None:
    """The read task carries the model voxel's volume, and the encoder actor flags slices from the model's
    segmentation without its small lesions, exactly as ``encode_here`` does (called here without Ray). The
    shipped model marks specks in both tiny phantoms, which the size rule removes."""
    from fdn_core.data.readers import find_cases
    from fdn_core.model.bundle import load_bundle
    from fdn_core.ray_index import _absolute, _Encoder, _files_to_json, _read_case
    from fdn_core.resources import shipped_model_dir
    from fdn_core.retrieval import _predicted_flags, encode_here

    case = next(c for c in find_cases(tiny_cohort) if c.case_id == case_id)
    folder = tmp_path / "unlabelled" / case.case_id
    folder.mkdir(parents=True)
    for path in (case.images or {}).values():
        shutil.copy(path, folder / path.name)  # the images only: no tumour labels
    (unlabelled,) = find_cases(folder.parent)
    assert unlabelled.seg is None
    bundle = load_bundle(shipped_model_dir())
    row = {"i": 0, "files": _files_to_json(_absolute(unlabelled)), "id_known": False}
    read = _read_case(row, preprocess=bundle.preprocess, digests=np.zeros(0, dtype="S32"))
    assert read["status"] == "new" and not read["has_labels"] and read["voxel_ml"] > 0
    actor = object.__new__(_Encoder)  # the actor's state without Ray
    actor.bundle, actor.batch_size, actor.where = bundle, None, "here"
    batch = {k: np.array([v]) if np.isscalar(v) else [v] for k, v in read.items()}
    flags = actor(batch)["has_abnormal"][0]
    seg = bundle.encode_slices(read["images"]).seg
    unfiltered = _predicted_flags(seg, None)
    assert unfiltered.sum() > flags.sum(), "no specks to remove in this case"
    assert flags.any() == (case_id == "phantom_0000")
    np.testing.assert_array_equal(flags, _predicted_flags(seg, read["voxel_ml"]))
    local = encode_here(bundle, _EmptyDb(), unlabelled)
    np.testing.assert_array_equal(flags, local.has_abnormal)


class _EmptyDb:
    """What ``encode_here`` asks of a database that holds nothing."""

    def __contains__(self, case_id: object) -> bool:
        return False

    def cases_with_fingerprint(self, sha: str) -> list[str]:
        return []


# ---------------------------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A local Ray of 2 CPUs for this module, shut down after it (no Ray process outlives the tests)."""
    pytest.importorskip("ray.data", reason="the ray extra is not installed: pip install 'fdn-retrieval[ray]'")
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_ray_build_equals_the_single_process_build_and_resumes_without_encoding_again(
    local_ray: Any,
    tiny_cohort: Path,
    tiny_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import nibabel as nib

    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import find_cases
    from fdn_core.model.bundle import load_bundle
    from fdn_core.progress import Progress
    from fdn_core.ray_index import RayEncoder
    from fdn_core.retrieval import build_index

    data = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, data)
    ids = [c.case_id for c in find_cases(data)]
    bad = ids[-2]  # a NaN in one T1: the encoder (on a worker) reports it; --skip-bad goes on
    t1 = data / bad / f"{bad}_t1.nii.gz"
    img = nib.load(t1)
    voxels = np.asarray(img.dataobj).astype(np.float32)
    voxels[20, 20, 20] = np.nan
    nib.save(nib.Nifti1Image(voxels, img.affine), t1)
    bundle = load_bundle(tiny_bundle, device="cpu")
    ref = build_index(bundle, data, tmp_path / "ref", fit_hamming=False, skip_bad=True)

    def stop_after_three(done: int, total: int, message: str) -> None:
        if message == "Indexing cases" and done == 3:
            raise KeyboardInterrupt  # Ctrl-C after the third case

    db_path = tmp_path / "db"
    encoder = RayEncoder()  # the Ray initialised in this process (2 CPUs): 1 encoder actor + reads
    with pytest.raises(KeyboardInterrupt):
        build_index(bundle, data, db_path, progress=Progress(stop_after_three), commit_every=2,
                    fit_hamming=False, skip_bad=True, encoder=encoder)  # fmt: skip
    first = encoder.last_run
    assert first is not None and first.workers == 1 and not first.gpu and first.num_encoded >= 3
    assert local_ray.is_initialized()  # a Ray this process started itself is left running

    # The same command on Ray resumes: the 3 committed cases are hashed, not read or encoded again.
    common = ["--model", str(tiny_bundle), "--data", str(data), "--db", str(db_path), "--no-progress"]
    rc, out, err = _run(capsys, "index", "build", *common, "--ray", "--skip-bad", "--no-hamming")
    assert rc == 0, err
    assert "resumed an interrupted build" in out and "already indexed (skipped): 3 case(s)" in out
    assert "Ray: 1 CPU encoder(s); cases encoded: 2 on " in out
    assert "3 already indexed (not read again)" in out
    assert "skipped 1 bad case(s)" in out and bad in out and "NaN" in out

    db = CodeDatabase.open(db_path)
    db.verify()
    good = [c for c in ids if c != bad]
    assert db.cases == ref.database.cases == good  # the same case order
    for name in ("normal_codes", "abnormal_codes", "slice_indices", "has_abnormal", "case_starts"):
        a, b = np.asarray(getattr(db, name)), np.asarray(getattr(ref.database, name))
        assert a.dtype == b.dtype and np.array_equal(a, b), name  # bit for bit
    for case in good:
        assert db.source_fingerprint(case) == ref.database.source_fingerprint(case)
        assert db.sources(case) == ref.database.sources(case)
