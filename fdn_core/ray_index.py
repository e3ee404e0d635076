"""Index a cohort on a Ray cluster: ``fdn index build|add --ray [ADDRESS]`` (optional extra ``[ray]``).

The cases are read and encoded as one Ray Data pipeline, and come back to this process (the driver),
which alone commits them into the database, segment by segment, under its write lock
(``retrieval._index_into``, as without Ray)::

    from_items(one row per case, one block each)
      -> map(_read_case)         tasks, ``cpus_per_reader`` CPU each: hash the image files (content
                                 fingerprint); a case the database may hold already (its id, or its
                                 fingerprint, is in the database) is not loaded; else load + preprocess
      -> map_batches(_Encoder)   actors holding the loaded bundle, one case per call: ``num_gpus=1`` each
                                 when the cluster has GPUs (the device is chosen in the actor, at run
                                 time), else CPU actors of ``cpus_per_worker`` CPUs (torch threads)
      -> iter_batches(1)         the driver: checks each case against the database again (``_decide``),
                                 commits every ``commit_every`` cases, reports progress per case

Backpressure: every case is its own block, and Ray Data's streaming executor runs as many read tasks as
its object-store budget allows, so the cases in flight are bounded by memory, not by the cohort; the
driver pulls one case at a time (one batch prefetched), so it holds at most one commit batch of codes.
The whole dataset is never materialised. ``preserve_order`` keeps the cases in the order given, so a
database built on a cluster has the same case order (and, bit for bit, the same rows) as one built in
a single process; a slow case holds the cases after it back, within the same memory bound.

Resume: the read tasks get the database's fingerprints as they were when the run started (a sorted
array of 32-byte digests), so committed cases are hashed but neither loaded nor encoded again; the driver
decides every case against the live database (``retrieval._decide``), as the single-process path does.
A case that turns out to be new after all (removed from the database meanwhile) is encoded here.

Nothing is contacted but the Ray address given (``auto``: the cluster this node belongs to;
``ray://host:10001``: Ray Client); without one a local Ray is started (usage statistics off, no
dashboard) and shut down afterwards. Every node must see the cohort and the model bundle at the same
absolute paths (shared storage) and have the same fdn-retrieval installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.codes.database import CodeDatabase
from fdn_core.data.preprocess import PreprocessConfig
from fdn_core.data.readers import CaseFiles
from fdn_core.errors import ConfigError, DataError, FDNError, ModelMismatchError
from fdn_core.model.bundle import InferenceBundle
from fdn_core.retrieval import EncodedCase, EncoderFailed, encode_here

__all__ = ["RAY_INSTALL_HINT", "RayEncoder", "RayRun", "ray_available", "require_ray"]

log = logging.getLogger(__name__)

#: How to install what ``--ray`` needs.
RAY_INSTALL_HINT = "pip install 'fdn-retrieval[ray]' (or: pip install 'ray[data]>=2.50,<3')"
_STORAGE_HINT = (
    "with --ray every node reads the cohort and the model at the same absolute paths: put them on storage "
    "that every node mounts at the same place"
)


def ray_available() -> bool:
    """Whether Ray (with Ray Data) can be imported here."""
    try:
        require_ray()
    except ConfigError:
        return False
    return True


def require_ray() -> Any:
    """The ``ray`` module with Ray Data imported; ConfigError saying how to install it when it is missing."""
    try:
        import ray
        import ray.data  # Ray Data needs pyarrow and pandas: the [data] extra
    except ImportError as exc:
        raise ConfigError(
            f"--ray needs Ray with Ray Data, which cannot be imported here ({exc}); install it with "
            f"{RAY_INSTALL_HINT}, on this machine and on every node of the cluster"
        ) from None
    return ray


# ------------------------------------------------------------------------------------------ the workers


def _absolute(f: CaseFiles) -> CaseFiles:
    """``f`` with absolute paths: Ray workers do not share the driver's working directory."""

    def fix(p: Path | None) -> Path | None:
        return None if p is None else Path(os.path.abspath(p))

    images = None if f.images is None else {m: Path(os.path.abspath(p)) for m, p in f.images.items()}
    return dataclasses.replace(f, images=images, image4d=fix(f.image4d), seg=fix(f.seg), anat=fix(f.anat))


def _digests(db: CodeDatabase) -> np.ndarray:
    """The database's content fingerprints as a sorted array of 32-byte digests (read tasks get it once
    through the object store, without copying)."""
    shas = {db.source_fingerprint(c) for c in db.cases}
    raw = sorted(bytes.fromhex(s) for s in shas if s)
    return np.array(raw, dtype="S32") if raw else np.zeros(0, dtype="S32")


def _known(digests: np.ndarray, sha: str) -> bool:
    key = np.array([bytes.fromhex(sha)], dtype="S32")
    at = int(np.searchsorted(digests, key[0]))
    return at < digests.shape[0] and digests[at] == key[0]


def _files_to_json(files: CaseFiles) -> str:
    """A case's files as JSON text for a Ray row (plain data, no pickle)."""
    doc = dataclasses.asdict(files)
    for key in ("image4d", "seg", "anat"):
        doc[key] = None if doc[key] is None else str(doc[key])
    if doc["images"] is not None:
        doc["images"] = {k: str(v) for k, v in doc["images"].items()}
    if doc["channel_order"] is not None:
        doc["channel_order"] = list(doc["channel_order"])
    return json.dumps(doc)


def _files_from_json(text: str) -> CaseFiles:
    """The inverse of ``_files_to_json``."""
    doc = json.loads(text)
    for key in ("image4d", "seg", "anat"):
        doc[key] = None if doc[key] is None else Path(doc[key])
    if doc["images"] is not None:
        doc["images"] = {k: Path(v) for k, v in doc["images"].items()}
    if doc["channel_order"] is not None:
        doc["channel_order"] = tuple(doc["channel_order"])
    return CaseFiles(**doc)


def _read_case(row: dict[str, Any], *, preprocess: PreprocessConfig, digests: np.ndarray) -> dict[str, Any]:
    """Ray task: hash one case; load and preprocess it unless the database may hold it already."""
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.provenance import case_fingerprint
    from fdn_core.data.readers import load_case
    from fdn_core.retrieval import _case_problem, _slice_flags

    f = _files_from_json(row["files"])
    s = preprocess.image_size
    out: dict[str, Any] = {
        "i": row["i"],
        "status": "new",
        "sha": "",
        "problem": "",
        "missing": "",
        "images": np.zeros((0, 4, s, s), np.float32),
        "label_flags": np.zeros(0, bool),
        "has_labels": False,
        "voxel_ml": 0.0,
    }
    try:
        sha = case_fingerprint(f)
        out["sha"] = sha
        if row["id_known"] or _known(digests, sha):
            out["status"] = "known"  # the driver decides (already indexed, or a namesake): nothing to load
            return out
        stack = volume_to_slices(load_case(f), preprocess)
    except (DataError, OSError) as exc:
        out["status"], out["problem"] = "bad", _case_problem(f, exc)
        missing = [p for p in f.all_paths() if not p.exists()]
        out["missing"] = f"{socket.gethostname()}\0{missing[0]}" if missing else ""
        return out
    out["images"] = np.ascontiguousarray(stack.images, dtype=np.float32)
    out["voxel_ml"] = float(stack.voxel_ml or 0.0)
    if stack.seg is not None:
        out["label_flags"], out["has_labels"] = _slice_flags(stack.seg), True
    return out


def _first(column: Any) -> Any:
    """The one value of a batch column (a ragged tensor column comes as an object array of arrays)."""
    value = column[0]
    return value.item() if isinstance(value, np.generic) else value


class _Encoder:
    """Ray actor: holds the bundle (loaded once, on the device Ray gave it) and encodes one case a call."""

    def __init__(self, bundle_path: str, fingerprint: str, batch_size: int | None, threads: int) -> None:
        import ray
        import torch

        from fdn_core.model.bundle import load_bundle

        self.where = socket.gethostname()
        if ray.get_gpu_ids():
            device = "auto"  # Ray made this actor's GPU the visible one: select_device picks it
            # Codes must not depend on where they were computed: no TF32 in the encoder's convolutions.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        else:
            device = "cpu"  # a CPU actor never takes a GPU that Ray gave another actor
            torch.set_num_threads(max(1, threads))
        try:
            self.bundle = load_bundle(bundle_path, device=device)
        except (FDNError, OSError) as exc:
            raise DataError(
                f"node {self.where}: cannot load the model bundle {bundle_path} ({exc}); {_STORAGE_HINT}"
            ) from None
        if self.bundle.fingerprint != fingerprint:
            raise ModelMismatchError(
                f"node {self.where}: the model bundle at {bundle_path} is another model "
                f"({self.bundle.fingerprint[:12]}...) than the driver's ({fingerprint[:12]}...); "
                f"{_STORAGE_HINT}"
            )
        self.batch_size = batch_size
        self.where = f"{self.where} {self.bundle.device}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from fdn_core.retrieval import _predicted_flags

        h, w = self.bundle.grid_shape
        status, problem = str(_first(batch["status"])), str(_first(batch["problem"]))
        normal = abnormal = np.zeros((0, h, w), np.uint16)
        flags = np.zeros(0, bool)
        images = np.asarray(_first(batch["images"]), dtype=np.float32)
        if status == "new" and images.shape[0] == 0:
            status, problem = "bad", "the volume has no axial slices"
        elif status == "new":
            if not images.flags.writeable:
                images = images.copy()  # a zero-copy view of the object store; torch wants its own
            try:
                enc = self.bundle.encode_slices(images, batch_size=self.batch_size)
            except DataError as exc:
                status, problem = "bad", str(exc)
            else:
                normal, abnormal = enc.normal, enc.abnormal
                has_labels = bool(_first(batch["has_labels"]))
                flags = (
                    np.asarray(_first(batch["label_flags"]), bool)
                    if has_labels
                    else _predicted_flags(enc.seg, float(_first(batch["voxel_ml"])) or None)
                )
        return {
            "i": np.asarray(batch["i"][:1]),
            "status": np.array([status]),
            "sha": np.asarray(batch["sha"][:1]),
            "problem": np.array([problem]),
            "missing": np.asarray(batch["missing"][:1]),
            "where": np.array([self.where if status == "new" else ""]),
            "normal": normal[None],
            "abnormal": abnormal[None],
            "has_abnormal": flags[None],
        }


# ------------------------------------------------------------------------------------------- the driver


@dataclass
class RayRun:
    """What the last run of a ``RayEncoder`` did: its encoder actors, and per case where it was encoded
    (``encoded``: on the cluster, by "host device"), skipped (``known``: the database holds it; not loaded),
    found bad, or encoded on the driver (``local``: new after all)."""

    workers: int = 0
    gpu: bool = False
    encoded: Counter[str] = field(default_factory=Counter)
    known: int = 0
    bad: int = 0
    local: int = 0
    operators: list[str] = field(default_factory=list)

    @property
    def num_encoded(self) -> int:
        """Cases encoded on the cluster."""
        return sum(self.encoded.values())


@dataclass
class RayEncoder:
    """A ``retrieval.CaseEncoder`` that reads and encodes on a Ray cluster (module docstring).

    ``address``: None (or "local") starts a local Ray of ``num_cpus`` CPUs (default: all) for the run;
    "auto" joins the cluster this node belongs to; "ray://host:10001" connects through Ray Client. If Ray
    is initialised in this process already, that Ray is used (and left running).
    ``device``: "auto" (GPU actors when the cluster has GPUs), "cuda" (GPU actors) or "cpu" (CPU actors).
    ``workers``: encoder actors (default: one per GPU; CPU actors: half the cluster's CPUs, at least 1).
    ``cpus_per_worker``: CPUs (torch threads) per CPU actor; GPU actors reserve as many CPUs to feed them.
    ``cpus_per_reader``, ``memory_per_reader``: CPUs and bytes of memory each read task reserves (one
    case: a phantom case of four 240x240x155 sequences and two label maps took up to 0.85 GiB).
    """

    address: str | None = None
    device: str = "auto"
    workers: int | None = None
    cpus_per_worker: float = 1.0
    cpus_per_reader: float = 1.0
    memory_per_reader: int = 3 << 29  # 1.5 GiB
    num_cpus: int | None = None
    last_run: RayRun | None = None

    def __post_init__(self) -> None:
        dev = self.device.lower()
        self.device = "cuda" if dev.startswith("cuda") else dev
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(
                f"device {self.device!r} with --ray: use auto (GPU encoders when the cluster has GPUs), cuda "
                "or cpu"
            )
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers={self.workers}: at least one encoder is needed")
        if self.cpus_per_worker <= 0 or self.cpus_per_reader <= 0 or self.memory_per_reader < 1 << 20:
            raise ConfigError("cpus_per_worker and cpus_per_reader must be > 0, memory_per_reader >= 1 MiB")

    @contextlib.contextmanager
    def _session(self, ray: Any) -> Iterator[None]:
        """Ray for one run: the one initialised in this process, or a new connection / local instance."""
        if ray.is_initialized():
            yield
            return
        local = self.address in (None, "", "local")
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if local:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves this machine
            kwargs.update(address="local", num_cpus=self.num_cpus, include_dashboard=False)
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = "a local Ray" if local else f"the Ray cluster at {self.address!r}"
            raise ConfigError(
                f"cannot start or reach {where} ({exc}); for a cluster, run `ray start --head` on its head "
                "node and `ray start --address=HEAD:6379` on the others, then pass --ray auto on a node of "
                "the cluster, or --ray ray://HEAD:10001 from elsewhere (`ray status` shows the cluster)"
            ) from exc
        try:
            yield
        finally:
            ray.shutdown()

    def _plan(self, ray: Any) -> tuple[int, bool]:
        """(encoder actors, GPU actors?) for the cluster's resources; ConfigError when they cannot run."""
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), int(res.get("GPU", 0))
        gpu = self.device == "cuda" or (self.device == "auto" and gpus > 0)
        if gpu and gpus < 1:
            raise ConfigError(
                "device cuda with --ray, but the Ray cluster has no GPU; start its nodes on GPU machines "
                "(`ray status` lists the GPUs) or use --device cpu"
            )
        workers = self.workers or (gpus if gpu else max(1, int(cpus // (2 * self.cpus_per_worker))))
        if gpu and workers > gpus:
            raise ConfigError(f"{workers} GPU encoders asked for, but the Ray cluster has {gpus} GPU(s)")
        need = workers * self.cpus_per_worker + self.cpus_per_reader
        if need > cpus:
            raise ConfigError(
                f"{workers} encoder(s) of {self.cpus_per_worker:g} CPU and read tasks of "
                f"{self.cpus_per_reader:g} CPU need {need:g} CPUs, but the Ray cluster has {cpus:g}; "
                "use fewer --ray-workers (or --ray-cpus), or add nodes"
            )
        return workers, gpu

    def __call__(
        self,
        bundle: InferenceBundle,
        db: CodeDatabase,
        files: Sequence[CaseFiles],
        batch_size: int | None,
    ) -> Iterator[EncodedCase]:
        """Yield each case of ``files``, in order, read and encoded on the cluster (module docstring)."""
        ray = require_ray()
        run = RayRun()
        self.last_run = run
        if not files:
            return
        with self._session(ray), _quiet_ray_data() as ctx:
            run.workers, run.gpu = self._plan(ray)
            log.info(
                "Ray: %d %s encoder(s); cluster resources %s",
                run.workers,
                "GPU" if run.gpu else "CPU",
                ray.cluster_resources(),
            )
            ds = self._pipeline(ray, bundle, db, files, batch_size, run, ctx)
            try:
                yield from self._collect(ray, ds, bundle, db, files, batch_size, run)
            except FDNError:
                raise
            except Exception as exc:  # a Ray failure: worker code, a lost node, a dead actor
                raise EncoderFailed(f"the Ray pipeline stopped: {_describe(exc)}") from exc

    def _pipeline(
        self,
        ray: Any,
        bundle: InferenceBundle,
        db: CodeDatabase,
        files: Sequence[CaseFiles],
        batch_size: int | None,
        run: RayRun,
        ctx: Any,
    ) -> Any:
        from ray.data import ActorPoolStrategy

        rows = [
            {"i": i, "files": _files_to_json(_absolute(f)), "id_known": f.case_id in db}
            for i, f in enumerate(files)
        ]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map(
            _read_case,
            fn_kwargs={"preprocess": bundle.preprocess, "digests": _digests(db)},
            num_cpus=self.cpus_per_reader,
            # A memory reservation the encoders do not have also keeps Ray Data from fusing the reads into
            # the encoders' actors: reading scales with the cluster's CPUs, not with the encoders.
            memory=self.memory_per_reader,
        )
        threads = max(1, int(self.cpus_per_worker))
        return ds.map_batches(
            _Encoder,
            fn_constructor_kwargs={
                "bundle_path": str(Path(bundle.path).absolute()),
                "fingerprint": bundle.fingerprint,
                "batch_size": batch_size,
                "threads": threads,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=run.workers),
            num_cpus=self.cpus_per_worker,
            num_gpus=1 if run.gpu else 0,
        )

    def _collect(
        self,
        ray: Any,
        ds: Any,
        bundle: InferenceBundle,
        db: CodeDatabase,
        files: Sequence[CaseFiles],
        batch_size: int | None,
        run: RayRun,
    ) -> Iterator[EncodedCase]:
        """Pull the cases one by one, in order, and decide each against the live database."""
        from fdn_core.retrieval import _decide

        waiting: dict[int, EncodedCase] = {}
        following = 0
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            i = int(_first(batch["i"]))
            f = files[i]
            status, sha = str(_first(batch["status"])), str(_first(batch["sha"])) or None
            problem = str(_first(batch["problem"]))
            if status == "bad":
                run.bad += 1
                item = EncodedCase(
                    f, sha, problem=_with_storage_hint(f, problem, str(_first(batch["missing"])))
                )
            else:
                note, clash = _decide(db, f, sha) if sha else (None, None)
                if note is not None or clash is not None:
                    run.known += status == "known"
                    item = EncodedCase(f, sha, note=note, problem=clash)
                elif status == "known":  # removed from the database since the run started: encode it here
                    run.local += 1
                    item = encode_here(bundle, db, f, batch_size)
                else:
                    run.encoded[str(_first(batch["where"]))] += 1
                    item = EncodedCase(
                        f,
                        sha,
                        normal=np.asarray(_first(batch["normal"]), dtype=np.uint16),
                        abnormal=np.asarray(_first(batch["abnormal"]), dtype=np.uint16),
                        has_abnormal=np.asarray(_first(batch["has_abnormal"]), dtype=bool),
                    )
            waiting[i] = item
            while following in waiting:  # in order (Ray Data preserves it; this only guards it)
                yield waiting.pop(following)
                following += 1
        if following != len(files):
            raise EncoderFailed(f"the Ray pipeline returned {following} of {len(files)} cases")
        with contextlib.suppress(Exception):  # diagnostics only
            stats = str(ds.stats())
            run.operators = re.findall(r"^Operator \d+ (.+?): ", stats, flags=re.MULTILINE)
            log.debug("Ray Data: %s", stats)


def _with_storage_hint(f: CaseFiles, problem: str, missing: str) -> str:
    """A worker's problem, plus the shared-storage advice when a file it could not see exists here."""
    text = problem if f.case_id in problem else f"case {f.case_id}: {problem}"
    host, _, path = missing.partition("\0")
    if path and Path(path).exists():
        text += f" (node {host} cannot see {path}, which exists on this machine; {_STORAGE_HINT})"
    return text


def _describe(exc: BaseException) -> str:
    """The most telling message of a Ray failure: our own error when one caused it (in this process, or in
    a worker: Ray passes the worker's traceback on as text), else Ray's first line."""
    seen: set[int] = set()
    texts = []
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, FDNError):
            return str(cur)
        texts.append(re.sub(r"\x1b\[[0-9;]*m", "", str(cur)))
        cur = cur.__cause__ or cur.__context__
    for text in texts:
        ours = re.findall(r"^fdn_core\.[\w.]+?\.(?:\w*Error|Cancelled): (.+)$", text, flags=re.MULTILINE)
        if ours:
            return str(ours[-1]).strip()
    text = next((t.strip() for t in texts if t.strip()), "")
    first = text.splitlines()[0] if text else type(exc).__name__
    if "No module named" in text:
        first += "; install the same fdn-retrieval on every node of the cluster"
    return first


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[Any]:
    """Ray Data's context for one run: order preserved, no progress bars of its own (the CLI draws one
    bar per case), its start-up logging at warnings; restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    loggers = [logging.getLogger(n) for n in ("ray", "ray.data")]
    levels = [lg.level for lg in loggers]
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
