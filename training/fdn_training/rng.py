"""Random number generators of a training run: seeding, DataLoader workers, and RNG state for checkpoints.

A run seeds python / numpy / torch once, from (run.seed, rank), and never again; a checkpoint stores every
rank's RNG states (``rng_state``) and a resumed run restores them (``set_rng_state``), so it continues
with the very random numbers the uninterrupted run would have drawn. The states are tensors and plain
types, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["derive_seed", "rng_state", "seed_everything", "set_rng_state", "worker_init"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing: no correlated streams)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed the global python, numpy and torch (all devices) generators."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def worker_init(worker_id: int) -> None:
    """Seed python/numpy in each DataLoader worker from its torch seed (the loader's generator sets it)."""
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


def _mps_ready() -> bool:
    return bool(torch.backends.mps.is_available())


def rng_state() -> dict[str, Any]:
    """This process's python / numpy / torch (and CUDA or MPS) RNG states."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_ready():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states of ``rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and _mps_ready():
        torch.mps.set_rng_state(state["mps"])
