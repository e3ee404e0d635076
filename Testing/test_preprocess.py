"""Preprocessing: z-score statistics, slicing to model size and the exact inverse for labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fdn_core.config import config_from_dict
from fdn_core.data.preprocess import (
    PreprocessConfig,
    SliceGeometry,
    slices_to_volume,
    volume_to_slices,
    zscore_volume,
)
from fdn_core.data.readers import CaseFiles, CaseVolume
from fdn_core.errors import ConfigError, DataError


def _brain(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (4,X,Y,Z) image > 0 inside an off-centre ellipsoid and 0 outside, plus the mask."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = ((x - 0.1) / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 < 1
    image = np.zeros((4, *shape), np.float32)
    for c in range(4):
        image[c][mask] = rng.gamma(4.0 + c, 50.0, size=int(mask.sum())) + 1.0
    return image, mask


def _case(shape: tuple[int, int, int], seed: int = 0) -> CaseVolume:
    image, mask = _brain(shape, seed)
    x = np.arange(shape[0])[:, None, None]
    seg = np.where(mask & (x > shape[0] // 2), 1 + (np.indices(shape).sum(0) % 3), 0).astype(np.uint8)
    anat = np.where(mask, 1 + (x >= shape[0] // 2), 0).astype(np.uint8) * np.ones(shape, np.uint8)
    files = CaseFiles("c", "brats", {}, None, None, None)
    return CaseVolume("c", image, seg, anat, np.eye(4), (1.0, 1.0, 1.0), files)


def test_zscore_is_standard_inside_brain_and_exactly_zero_outside() -> None:
    image, mask = _brain((20, 18, 10), seed=1)
    image[2][mask & (np.arange(20)[:, None, None] < 8)] = 0.0  # channel 2 has a smaller brain mask
    z = zscore_volume(image)
    assert z.dtype == np.float32 and z.shape == image.shape
    for c in range(4):
        inside = image[c] > 0
        assert abs(float(z[c][inside].mean())) < 1e-5
        assert abs(float(z[c][inside].std()) - 1.0) < 1e-5
        assert np.all(z[c][~inside] == 0.0)
    assert np.count_nonzero(z[2]) < np.count_nonzero(z[1])


def test_zscore_edge_cases() -> None:
    image = np.zeros((4, 5, 5, 3), np.float32)
    image[1, 1:3, 1:3, :] = 7.0  # constant brain
    z = zscore_volume(image)
    assert np.all(z == 0.0)
    with pytest.raises(DataError, match="channels, X, Y, Z"):
        zscore_volume(np.zeros((5, 5, 3)))


def test_volume_to_slices_shapes_dtypes_and_every_slice() -> None:
    case = _case((40, 30, 7))
    stack = volume_to_slices(case, PreprocessConfig(64))
    assert stack.images.shape == (7, 4, 64, 64) and stack.images.dtype == np.float32
    assert stack.seg.shape == (7, 64, 64) and stack.seg.dtype == np.uint8
    assert stack.anat.shape == (7, 64, 64) and stack.anat.dtype == np.uint8
    assert set(np.unique(stack.seg)) <= {0, 1, 2, 3} and set(np.unique(stack.anat)) <= {0, 1, 2}
    # slice k of the stack is axial slice k of the volume: the first and last slices have the least brain
    brain_per_slice = (np.abs(stack.images[:, 0]) > 0).sum(axis=(1, 2))
    assert brain_per_slice[3] > brain_per_slice[0] and brain_per_slice[3] > brain_per_slice[-1]
    # padding (Y: 30 -> 40, centred) is exactly zero
    g = stack.geometry
    assert (g.pad_x, g.pad_y, g.side) == ((0, 0), (5, 5), 40)
    assert np.all(stack.images[:, :, :, :7] == 0) and np.all(stack.images[:, :, :, -7:] == 0)


def test_empty_slices_are_kept() -> None:
    case = _case((16, 16, 6))
    case.image[:, :, :, 0] = 0.0
    case.seg[:, :, 0] = 0
    stack = volume_to_slices(case, PreprocessConfig(64))
    assert stack.images.shape[0] == 6 and np.all(stack.images[0] == 0) and np.all(stack.seg[0] == 0)


@pytest.mark.parametrize("shape", [(16, 12, 5), (12, 16, 5), (16, 16, 5), (32, 21, 3)])
def test_label_round_trip_is_exact_when_upsampling(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    geometry = SliceGeometry.for_shape(shape[0], shape[1], 64)
    model = geometry.to_model(labels.transpose(2, 0, 1), "nearest")
    assert model.shape == (shape[2], 64, 64) and model.dtype == np.uint8
    back = slices_to_volume(model, geometry)
    assert back.shape == shape and back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)


def test_label_round_trip_when_downsampling_keeps_shapes() -> None:
    shape = (150, 110, 4)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    blob = ((x - 70) ** 2 / 40**2 + (y - 50) ** 2 / 25**2) < 1
    labels = np.repeat(blob[..., None], shape[2], axis=2).astype(np.uint8) * 2
    geometry = SliceGeometry.for_shape(shape[0], shape[1], 64)
    back = slices_to_volume(geometry.to_model(labels.transpose(2, 0, 1), "nearest"), geometry)
    assert back.shape == shape
    inter = np.logical_and(back == 2, labels == 2).sum()
    assert 2 * inter / ((back == 2).sum() + (labels == 2).sum()) > 0.97


def test_image_round_trip_and_torch_tensors() -> None:
    shape = (24, 20, 3)
    x, y, _ = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    smooth = np.stack([np.sin(3 * x + c) + np.cos(2 * y) for c in range(4)]).astype(np.float32)  # (4,X,Y,Z)
    geometry = SliceGeometry.for_shape(shape[0], shape[1], 96)
    slices = geometry.to_model(smooth.transpose(3, 0, 1, 2), "bilinear")
    assert slices.shape == (3, 4, 96, 96) and slices.dtype == np.float32
    back = slices_to_volume(slices, geometry, mode="bilinear")
    assert back.shape == (4, *shape)
    interior = (slice(None), slice(2, -2), slice(2, -2))
    assert np.abs(back[interior] - smooth[interior]).max() < 0.05
    as_tensor = geometry.to_model(torch.from_numpy(smooth.transpose(3, 0, 1, 2).copy()), "bilinear")
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), slices, atol=1e-6)
    labels = torch.zeros((3, 96, 96), dtype=torch.int64)
    assert slices_to_volume(labels, geometry).shape == shape


def test_geometry_checks_and_serialisation() -> None:
    g = SliceGeometry.for_shape(15, 10, 64)
    assert g.pad_y == (2, 3) and g.side == 15
    assert SliceGeometry.from_dict(g.to_dict()) == g
    with pytest.raises(DataError, match="geometry is for"):
        g.to_model(np.zeros((2, 10, 15), np.float32))
    with pytest.raises(DataError, match="expected"):
        g.to_volume(np.zeros((2, 32, 32), np.uint8))


def test_preprocess_config_validation(tmp_path: Path) -> None:
    assert config_from_dict(PreprocessConfig, {"image_size": 128}).image_size == 128
    for bad in (48, 100, 272):
        with pytest.raises(ConfigError, match="image_size"):
            PreprocessConfig(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(PreprocessConfig, {"image_size": 128, "zscore": True})
