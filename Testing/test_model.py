"""The feature decomposing network: shapes, config validation, code order, EMA codebooks, gradients."""

from __future__ import annotations

import pytest
import torch

from fdn_core.config import config_from_dict
from fdn_core.errors import ConfigError, DataError
from fdn_core.losses import FDNLoss, LossConfig, abnormal_flags
from fdn_core.model import FDN, FDNConfig, condition_map


def tiny_config(image_size: int = 64, latent_size: int = 8, **kw: object) -> FDNConfig:
    base = dict(
        image_size=image_size,
        latent_size=latent_size,
        stem_channels=8,
        encoder_channels=(8, 16),
        code_dim=8,
        num_codes=16,
        spade_hidden_channels=8,
        critic_channels=8,
    )
    base.update(kw)
    return FDNConfig(**base)  # type: ignore[arg-type]


def blob_batch(n: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth 'brains' with a bright blob (label 2) in the first half of the slices."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    brain = ((xx**2 + yy**2) < 0.7).float()
    images = torch.stack([brain * (1.0 + 0.3 * c) for c in range(4)]).unsqueeze(0).repeat(n, 1, 1, 1)
    seg = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n // 2):
        cy, cx = -0.3 + 0.2 * i, 0.2 - 0.1 * i
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < 0.04
        seg[i][blob] = 2
        images[i, :, blob] += 2.0
    return images + 0.05 * torch.randn_like(images), seg


@pytest.mark.parametrize(("image_size", "latent_size"), [(64, 4), (64, 8), (64, 16), (128, 32)])
def test_output_shapes_for_every_latent_size(image_size: int, latent_size: int) -> None:
    cfg = tiny_config(image_size, latent_size)
    model = FDN(cfg)
    x = torch.randn(2, 4, image_size, image_size)
    out = model(x)
    s, h = image_size, latent_size
    assert out.seg_logits.shape == (2, 4, s, s)
    assert out.recon_full.shape == out.recon_normal.shape == (2, 4, s, s)
    for z in (out.z_e_normal, out.z_e_abnormal, out.z_q_normal, out.z_q_abnormal):
        assert z.shape == (2, cfg.code_dim, h, h)
    assert out.idx_normal.shape == out.idx_abnormal.shape == (2, h, h)
    assert out.idx_normal.dtype == torch.int64
    assert out.commitment.ndim == 0 and float(out.commitment.detach()) > 0
    assert model.critic(out.z_q_normal).shape == (2,)
    assert len(cfg.resolved_decoder_channels) == cfg.num_stages + 1
    for idx in model.encode(x):
        assert idx.shape == (2, h, h) and int(idx.min()) >= 0 and int(idx.max()) < cfg.num_codes
    assert model.codebook("normal").shape == model.codebook("abnormal").shape == (cfg.num_codes, cfg.code_dim)


def test_paper_defaults() -> None:
    cfg = FDNConfig()
    assert (cfg.image_size, cfg.latent_size, cfg.code_dim, cfg.num_codes) == (256, 8, 64, 512)
    assert cfg.num_stages == 5
    assert cfg.resolved_decoder_channels == (128, 128, 128, 128, 64, 32)
    assert (cfg.ema_decay, cfg.ema_epsilon, cfg.commitment_cost) == (0.99, 1e-5, 0.25)
    model = FDN(cfg)
    # Encoder tower: 3 x [res block, down] from 64x64 to 8x8, then res blocks 128 -> 128 -> 64 (Table C.1).
    assert len(model.tower_normal) == 3 * 2 + 2
    assert model.tower_normal[-1].shortcut.out_channels == 64
    # Critic: 8 -> 4 -> 2 -> 1 with 4x4 stride-2 convs, then two 1x1 convs (Table C.3).
    convs = [m for m in model.critic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(4, 4)] * 3 + [(1, 1)] * 2
    # No skip connections: the decoders' first layers take exactly the code dimension.
    assert model.seg_decoder.head[0].in_channels == model.image_decoder.stem.in_channels == 64


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"image_size": 48}, "between 64 and 256"),
        ({"image_size": 300}, "between 64 and 256"),
        ({"latent_size": 12}, "must be one of"),
        ({"image_size": 64, "latent_size": 32}, "power of two >= 4"),
        ({"image_size": 192, "latent_size": 8}, "power of two >= 4"),
        ({"stem_channels": 12}, "multiples of 8"),
        ({"code_dim": 4}, "multiples of 8"),
        ({"decoder_channels": (64, 32)}, "needs 6 values"),
        ({"num_codes": 70000}, "uint16"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"encoder_channels": (64, 128, 256)}, "exactly 2"),
    ],
)
def test_impossible_configs_are_rejected(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FDNConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_dict_rejects_unknown_and_ill_typed_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(FDNConfig, {"image_size": 64, "latent_size": 8, "bogus": 1}, "model")
    good = {f: getattr(FDNConfig(), f) for f in FDNConfig.__dataclass_fields__}
    good["encoder_channels"] = list(good["encoder_channels"])
    good["decoder_channels"] = []
    assert config_from_dict(FDNConfig, good, "model") == FDNConfig()
    with pytest.raises(ConfigError, match="latent_size"):
        config_from_dict(FDNConfig, {**good, "latent_size": "8"}, "model")
    with pytest.raises(ConfigError, match="power of two"):
        config_from_dict(FDNConfig, {**good, "latent_size": 32, "image_size": 64}, "model")
    explicit = config_from_dict(
        FDNConfig, {**good, "image_size": 64, "decoder_channels": [64, 32, 16, 8]}, "m"
    )
    assert explicit.resolved_decoder_channels == (64, 32, 16, 8)


def _spread_codebooks(model: FDN, x: torch.Tensor) -> None:
    """Put encoder outputs into the codebooks so that a grid uses many different codes."""
    with torch.no_grad():
        for z, vq in zip(model.encode_latents(x), (model.vq_normal, model.vq_abnormal), strict=True):
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            pick = torch.randperm(flat.shape[0])[: vq.num_embeddings]
            vq.embedding.weight.copy_(flat[pick])


def test_encode_is_nearest_codebook_in_row_major_image_order() -> None:
    model = FDN(tiny_config(64, 8)).eval()
    x = torch.randn(3, 4, 64, 64)
    _spread_codebooks(model, x)
    idx_n, idx_a = model.encode(x)
    z_n, z_a = model.encode_latents(x)
    for idx, z, which in ((idx_n, z_n, "normal"), (idx_a, z_a, "abnormal")):
        cb = model.codebook(which)
        b, _, h, w = z.shape
        manual = torch.empty(b, h, w, dtype=torch.long)
        for i in range(b):
            for r in range(h):
                for c in range(w):
                    manual[i, r, c] = torch.argmin(((cb - z[i, :, r, c]) ** 2).sum(1))
        assert torch.equal(idx, manual)
        assert len(idx.unique()) > 4
        assert not torch.equal(idx, idx.transpose(1, 2))  # the check above would catch a transposed grid
    # The flattened (h*w) code sequence, as stored by the database, is row-major.
    assert torch.equal(idx_n.reshape(3, -1)[:, 8 * 2 + 5], idx_n[:, 2, 5])


def test_decode_indices_matches_forward_in_eval_mode() -> None:
    model = FDN(tiny_config(64, 8)).eval()
    x = torch.randn(2, 4, 64, 64)
    _spread_codebooks(model, x)
    with torch.no_grad():
        out = model(x)
        seg, full, normal = model.decode_indices(*model.encode(x))
    assert torch.equal(out.idx_normal, model.encode(x)[0])
    torch.testing.assert_close(seg, out.seg_logits)
    torch.testing.assert_close(full, out.recon_full)
    torch.testing.assert_close(normal, out.recon_normal)


def test_decode_indices_and_forward_check_their_inputs() -> None:
    model = FDN(tiny_config(64, 8)).eval()
    with pytest.raises(DataError, match=r"expects \(B, 4, 64, 64\)"):
        model(torch.randn(1, 4, 32, 32))
    good = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(DataError, match="outside"):
        model.decode_indices(good + 16, good)
    with pytest.raises(DataError, match="shape"):
        model.decode_indices(torch.zeros(2, 4, 4, dtype=torch.long), good)
    with pytest.raises(DataError, match="pairs"):
        model.decode_indices(good[:1], good)
    with pytest.raises(ValueError, match="normal"):
        model.codebook("both")  # type: ignore[arg-type]


def test_ema_codebooks_update_only_in_train_mode() -> None:
    model = FDN(tiny_config(64, 8))
    x = torch.randn(4, 4, 64, 64)
    before = [model.codebook(w).clone() for w in ("normal", "abnormal")]
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    model.encode(x)
    model.decode_indices(*model.encode(x))
    for w, b in zip(("normal", "abnormal"), before, strict=True):
        assert torch.equal(model.codebook(w), b), f"{w} codebook changed outside a training forward"
    model(x)
    for w, b in zip(("normal", "abnormal"), before, strict=True):
        assert not torch.equal(model.codebook(w), b), f"{w} codebook did not update in train mode"
    assert float(model.vq_normal.ema_cluster_size.sum()) > 0
    assert not any(p.requires_grad for p in (model.codebook("normal"), model.codebook("abnormal")))


def test_condition_map_is_detached_softmax_zeroed_on_background() -> None:
    logits = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    cond = condition_map(logits)
    assert not cond.requires_grad
    p = torch.softmax(logits.detach(), 1)
    assert torch.equal(cond[..., 0], torch.zeros(1, 2, 1))  # argmax background -> zero
    torch.testing.assert_close(cond[..., 1], p[..., 1])


def test_recon_normal_ignores_the_abnormal_branch() -> None:
    """x_hat- depends only on z_q-: changing the abnormal codes changes x_hat+ and the labels only."""
    model = FDN(tiny_config(64, 8)).eval()
    x = torch.randn(2, 4, 64, 64)
    idx_n, idx_a = model.encode(x)
    with torch.no_grad():
        torch.nn.init.normal_(model.seg_decoder.out[-1].bias, std=3.0)  # make some pixels non-background
        seg1, full1, normal1 = model.decode_indices(idx_n, idx_a)
        seg2, full2, normal2 = model.decode_indices(idx_n, (idx_a + 1) % 16)
    torch.testing.assert_close(normal1, normal2)
    assert not torch.allclose(seg1, seg2)
    assert not torch.allclose(full1, full2)


def test_a_few_steps_reduce_the_loss() -> None:
    model = FDN(tiny_config(64, 8)).train()
    loss_fn = FDNLoss(LossConfig(dm_enabled=False), latent_size=8)
    opt = torch.optim.Adam(model.generator_parameters(), lr=3e-3)
    x, seg = blob_batch(2)
    losses = []
    for _ in range(8):
        total, terms = loss_fn.generator(model(x), x, seg)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(terms["total"])
    assert sum(losses[-2:]) / 2 < 0.75 * sum(losses[:2]) / 2, losses


def test_critic_step_changes_only_the_critic() -> None:
    model = FDN(tiny_config(64, 8)).train()
    x, seg = blob_batch(4)
    out = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_c = torch.optim.Adam(model.critic_parameters(), lr=1e-3)
    loss, terms = FDNLoss(LossConfig(), latent_size=8).critic(
        model.critic, out.z_q_normal.detach(), abnormal_flags(seg)
    )
    assert terms["dm_active"] == 1.0
    opt_c.zero_grad()
    loss.backward()
    opt_c.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(k.startswith("critic.") for k in changed), changed
    assert all(p.grad is None for p in model.generator_parameters())


def test_lreg_gradients_reach_only_the_normal_encoder_path() -> None:
    model = FDN(tiny_config(64, 8)).train()
    x, seg = blob_batch(4)
    out = model(x)
    only_reg = LossConfig(w_lat=0.0, w_seg=0.0, w_rec=0.0, w_dm=1.0)
    total, terms = FDNLoss(only_reg, latent_size=8).generator(out, x, seg, critic=model.critic)
    assert terms["dm_active"] == 1.0
    total.backward()

    def grad_norm(module: torch.nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(model.tower_normal) > 0
    assert grad_norm(model.stem) > 0
    for name in ("tower_abnormal", "seg_decoder", "image_decoder"):
        assert grad_norm(getattr(model, name)) == 0.0, name


def test_generator_parameters_exclude_critic_and_codebooks() -> None:
    model = FDN(tiny_config(64, 8))
    gen = {id(p) for p in model.generator_parameters()}
    assert not gen & {id(p) for p in model.critic_parameters()}
    assert id(model.codebook("normal")) not in gen
    assert len(gen) + len(list(model.critic_parameters())) == sum(
        1 for p in model.parameters() if p.requires_grad
    )


def test_quantiser_stays_float32_under_autocast() -> None:
    model = FDN(tiny_config(64, 8)).train()
    x = torch.randn(2, 4, 64, 64)
    cb = model.codebook("normal").detach().clone()  # the forward below updates it (EMA)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.z_e_normal.dtype == torch.bfloat16  # the convolutions did run in bf16
    assert out.z_q_normal.dtype == torch.float32
    assert model.codebook("normal").dtype == model.vq_normal.ema_w.dtype == torch.float32
    # Indices are the float32 nearest neighbours of the (bf16) encoder output, in (h, w) order.
    z = out.z_e_normal.float().detach()
    dist = ((z.permute(0, 2, 3, 1).unsqueeze(-2) - cb) ** 2).sum(-1)
    assert torch.equal(out.idx_normal, dist.argmin(-1))


def test_channels_last_gives_the_same_outputs() -> None:
    model = FDN(tiny_config(64, 8)).eval()
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(out.idx_normal, ref.idx_normal)
    torch.testing.assert_close(out.recon_full, ref.recon_full, rtol=1e-4, atol=1e-4)
