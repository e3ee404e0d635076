"""Run-time device selection: CUDA, then MPS, then CPU, with an explicit override."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fdn_core.errors import ConfigError

__all__ = ["autocast_for", "full_precision", "select_device"]


def select_device(override: str | None = "auto") -> torch.device:
    """Return the device to use. ``override``: "auto" (or None), "cuda", "cuda:N", "mps" or "cpu"."""
    choice = (override or "auto").lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {override!r} requested but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
            )
        return torch.device(choice)
    if choice == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' requested but Metal is not available; use --device cpu")
        return torch.device("mps")
    if choice == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {override!r}; use auto, cuda, cuda:N, mps or cpu")


@contextlib.contextmanager
def autocast_for(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA (where it speeds convolutions up); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off for ``device``'s type, whatever the caller enabled: code indices must not depend on the
    device or on mixed precision (a database built on a GPU is queried on a CPU)."""
    if device.type in ("cuda", "cpu", "mps", "xpu"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield
