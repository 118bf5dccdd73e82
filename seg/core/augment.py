"""Fine-tuning augmentations on batched tensors, on the training device (a GPU never waits for them).

``augment_batch(images, labels, cfg, seed)`` takes a batch of patches (B, 1, D, H, W) and their label maps
(B, D, H, W) and returns both augmented, each sample with its own random draw, in this order (nnU-Net's):

- spatial, one resampling per transformed sample: rotation about each array axis (up to ``rotation``
  degrees; ``[a, 0, 0]`` turns in-plane only), zoom in ``scale`` and an elastic deformation (a Gaussian
  displacement of ``elastic_alpha`` voxels on a lattice every ``elastic_sigma`` voxels, interpolated), each
  with probability ``spatial_prob`` / ``elastic_prob``. Angles and zooms are in voxel units. The image is
  interpolated linearly and padded with its minimum (air), the labels take the nearest voxel, padded with 0;
- mirroring along each axis with ``flip_prob``;
- intensity: scale and shift (uniform in +-``intensity_scale``, +-``intensity_shift``), gamma in
  ``gamma_range`` with ``gamma_prob`` (on the sample's [min, max] range, mean and std kept, as nnU-Net), Gaussian
  blur with sigma in ``blur_sigma`` with ``blur_prob``, Gaussian noise of std ``noise_std``.

Every draw comes from generators seeded with ``seed`` (the stage draws it from the run's generator), so a
resumed run augments exactly as an uninterrupted one. Samples a transform does not touch stay bit-identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seg.core.config import Augment


def gaussian_kernels(sigmas: torch.Tensor, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1D Gaussian kernels (N, 2R+1), one per sigma, each cut at ``int(truncate*sigma+0.5)``
    taps like ``scipy.ndimage.gaussian_filter1d`` (R: the largest such radius; sigma 0 is the identity)."""
    radii = (truncate * sigmas + 0.5).floor()
    radius = int(radii.max()) if sigmas.numel() else 0
    taps = torch.arange(-radius, radius + 1, dtype=sigmas.dtype, device=sigmas.device)
    safe = sigmas.clamp_min(1e-6)[:, None]
    weights = torch.exp(-0.5 * (taps[None] / safe) ** 2) * (taps[None].abs() <= radii[:, None])
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur every sample of ``x`` (B, C, D, H, W) with its own sigmas (B, 3) in voxels along D, H, W.

    Separable convolution, edges mirrored (scipy's ``mode="mirror"``), kernels truncated at 4 sigma.
    """
    b, c = x.shape[:2]
    out = x.reshape(1, b * c, *x.shape[2:])
    for axis in range(3):
        kernel = gaussian_kernels(sigmas[:, axis].to(x)).repeat_interleave(c, dim=0)
        extent = out.shape[2 + axis]
        radius = min(kernel.shape[1] // 2, extent - 1)
        kernel = kernel[:, kernel.shape[1] // 2 - radius: kernel.shape[1] // 2 + radius + 1]
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # only changes kernels wider than the volume
        if radius == 0:
            continue
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        out = F.conv3d(F.pad(out, pad, mode="reflect"), kernel.reshape(shape), groups=b * c)
    return out.reshape(x.shape)


def rotation_matrix(angles) -> torch.Tensor:
    """The 3x3 rotation (array axes D, H, W) turning by ``angles[i]`` radians about axis i, about D first."""
    out = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        turn = torch.eye(3, dtype=torch.float64)
        turn[i, i] = turn[j, j] = math.cos(angle)
        turn[i, j], turn[j, i] = -math.sin(angle), math.sin(angle)
        out = turn @ out
    return out


def sampling_grid(shape, matrix: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """``grid_sample``'s grid (1, D, H, W, 3) reading the input at ``c + matrix @ (v - c)`` (+ displacement
    (3, D, H, W), in voxels) for each output voxel index ``v``, ``c`` the patch centre (voxel units)."""
    # With align_corners=False the normalised coordinate of a centred voxel coordinate v is 2 v / size, so the
    # voxel-space matrix M acts on normalised coordinates as N M N^-1, N = diag(2 / size); grid_sample
    # orders the axes x, y, z (W, H, D).
    size = torch.tensor(shape, dtype=torch.float64)
    normalised = matrix.to(torch.float64) * (size[None, :] / size[:, None])  # N^-1 on the right, N on the left
    theta = torch.zeros(1, 3, 4, dtype=torch.float64)
    theta[0, :, :3] = normalised.flip(0).flip(1)
    grid = F.affine_grid(theta, [1, 1, *shape], align_corners=False)
    if displacement is not None:
        grid = grid + (2 * displacement.to(torch.float64) / size.view(3, 1, 1, 1)).flip(0).permute(1, 2, 3, 0)[None]
    return grid.to(torch.float32)


def warp(image: torch.Tensor, label: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample (1, D, H, W) and its labels (D, H, W) resampled on ``grid``: the image linearly, padded with
    its minimum; the labels by nearest voxel, padded with 0."""
    grid = grid.to(image.device)
    pad = image.amin()
    moved = F.grid_sample((image - pad)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(label[None, None].to(image.dtype), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)
    return moved[0] + pad, labels[0, 0].round().to(label.dtype)


def elastic_displacement(shape, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A smooth random displacement (3, D, H, W) in voxels: N(0, alpha) on a lattice every ``sigma`` voxels,
    interpolated trilinearly."""
    coarse = [max(2, math.ceil(n / sigma) + 1) for n in shape]
    lattice = torch.randn((1, 3, *coarse), generator=generator, dtype=torch.float64) * alpha
    return F.interpolate(lattice, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _chance(generator: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < p


def spatial(image, label, cfg: Augment, generator: torch.Generator):
    """The spatial transform of one sample (or the sample itself when none is drawn)."""
    matrix, displacement = torch.eye(3, dtype=torch.float64), None
    if any(cfg.rotation) and _chance(generator, cfg.spatial_prob):
        matrix = rotation_matrix([math.radians(_uniform(generator, -a, a)) for a in cfg.rotation]) @ matrix
    if tuple(cfg.scale) != (1.0, 1.0) and _chance(generator, cfg.spatial_prob):
        matrix = matrix / _uniform(generator, *cfg.scale)  # zoom s: the output at v shows the input at v / s
    if cfg.elastic_alpha and _chance(generator, cfg.elastic_prob):
        displacement = elastic_displacement(label.shape, cfg.elastic_alpha, cfg.elastic_sigma, generator)
    if displacement is None and torch.equal(matrix, torch.eye(3, dtype=torch.float64)):
        return image, label
    return warp(image, label, sampling_grid(label.shape, matrix, displacement))


def adjust_gamma(image: torch.Tensor, gamma: float) -> torch.Tensor:
    """nnU-Net's gamma (retain_stats): ``((x - min) / range) ** gamma`` mapped back to [min, max], then the
    sample's mean and standard deviation restored."""
    low, span = image.amin(), (image.amax() - image.amin()).clamp_min(1e-7)
    mean, std = image.mean(), image.std()
    out = ((image - low) / span) ** gamma * span + low
    return (out - out.mean()) / out.std().clamp_min(1e-7) * std + mean


def augment_batch(images: torch.Tensor, labels: torch.Tensor, cfg: Augment, seed: int):
    """``images`` (B, 1, D, H, W) and ``labels`` (B, D, H, W) augmented sample by sample (module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    device_generator = generator if images.device.type == "cpu" else \
        torch.Generator(images.device).manual_seed(seed + 1)
    out_images, out_labels = [], []
    for image, label in zip(images, labels):
        image, label = spatial(image, label, cfg, generator)
        for axis in range(3):
            if _chance(generator, cfg.flip_prob):
                image, label = image.flip(axis + 1), label.flip(axis)
        if cfg.intensity_scale:
            image = image * (1.0 + _uniform(generator, -cfg.intensity_scale, cfg.intensity_scale))
        if cfg.intensity_shift:
            image = image + _uniform(generator, -cfg.intensity_shift, cfg.intensity_shift)
        if _chance(generator, cfg.gamma_prob):
            image = adjust_gamma(image, _uniform(generator, *cfg.gamma_range))
        if _chance(generator, cfg.blur_prob):
            sigma = _uniform(generator, *cfg.blur_sigma)
            image = gaussian_blur(image[None], torch.full((1, 3), sigma, dtype=torch.float64))[0]
        if cfg.noise_std:
            image = image + cfg.noise_std * torch.randn(image.shape, generator=device_generator,
                                                        device=image.device, dtype=image.dtype)
        out_images.append(image)
        out_labels.append(label)
    return torch.stack(out_images).contiguous(), torch.stack(out_labels).contiguous()
