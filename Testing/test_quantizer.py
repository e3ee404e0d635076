"""The EMA quantiser: dead-code restarts (single process and two DDP ranks) and device-independent codes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fdn_core.model import FDN, FDNConfig
from fdn_core.model.blocks import FP32EMAQuantizer
from fdn_core.model.bundle import TINY_MODEL


def _quantizer(k: int = 16, d: int = 4, threshold: float = 0.0) -> FP32EMAQuantizer:
    q = FP32EMAQuantizer(spatial_dims=2, num_embeddings=k, embedding_dim=d, embedding_init="normal")
    q.restart_threshold = threshold
    return q


def _clustered(n: int, d: int = 4, seed: int = 0) -> torch.Tensor:
    """(n, d, 4, 4) latents around 3 far-apart centres: a 16-code codebook has room to spare."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[6.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 6.0, 0]])[:, :d]
    which = torch.randint(0, 3, (n, 4, 4), generator=g)
    z = centres[which] + 0.5 * torch.randn(n, 4, 4, d, generator=g)
    return z.permute(0, 3, 1, 2).contiguous()


def test_unused_codes_blow_up_without_restarts_and_not_with_them() -> None:
    torch.manual_seed(0)
    plain, restarting = _quantizer(), _quantizer(threshold=0.05)
    restarting.load_state_dict(plain.state_dict())
    for q in (plain, restarting):
        q.train()
        for step in range(30):
            q(_clustered(8, seed=step))
    plain_norms = plain.embedding.weight.norm(dim=1)
    assert plain_norms.max() > 1e3  # the EMA divides an unused code by its near-zero smoothed count
    norms = restarting.embedding.weight.norm(dim=1)
    assert restarting.restarts > 0 and norms.max() < 20.0  # every code sits among the data
    used = torch.unique(restarting.indices(_clustered(64, seed=99)))
    assert len(used) > len(torch.unique(plain.indices(_clustered(64, seed=99))))


def test_restarts_are_off_by_default_and_in_eval_mode() -> None:
    torch.manual_seed(0)
    q = _quantizer(threshold=0.05)
    before = q.embedding.weight.clone()
    q.eval()
    q(_clustered(8))
    assert torch.equal(before, q.embedding.weight) and q.restarts == 0
    assert _quantizer().restart_threshold == 0.0


def test_codes_are_the_same_with_and_without_autocast() -> None:
    """Encoder towers and quantisers run in float32 at inference whatever autocast the caller enabled."""
    torch.manual_seed(0)
    model = FDN(FDNConfig(**TINY_MODEL)).eval()
    x = torch.randn(6, 4, 64, 64)
    with torch.no_grad():
        plain = model.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.stem(x).dtype == torch.bfloat16  # autocast is really on here
            mixed = model.encode(x)
    assert torch.equal(plain[0], mixed[0]) and torch.equal(plain[1], mixed[1])


# ------------------------------------------------------------------------------------- two DDP ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same initial codebook on both ranks (as DDP's broadcast would make it)
        q = _quantizer(threshold=0.05)
        torch.manual_seed(100 + rank)  # different data and sampling RNG per rank
        q.train()
        for step in range(10):
            q(_clustered(4, seed=1000 * rank + step))
        torch.save(
            {"weight": q.embedding.weight.detach().clone(), "restarts": q.restarts}, Path(out) / f"{rank}.pt"
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_restarts_keep_codebooks_identical_across_ddp_ranks(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["restarts"] > 0 and r0["restarts"] == r1["restarts"]
    assert torch.equal(r0["weight"], r1["weight"])
