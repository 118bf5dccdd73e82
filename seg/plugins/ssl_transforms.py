"""Augmentations and corruptions of the PCRL / MoCo pretext tasks, on batched tensors (B, C, D, H, W).

Each follows the official PCRL 3D code (Luchixiang/PCRL, ``preprocess/luna_pre.py`` and
``datasets/luna_pcrl_pretask.py``) and runs on the tensors' device, so augmenting costs no data-loader work:

- ``paired_views``: two crops per patch whose boxes overlap with IoU > 0.25, of sizes drawn from the official
  list (``OFFICIAL_CROP_SCALES``, relative to the output size), resized trilinearly to one size;
- ``gaussian_blur``: separable Gaussian with a per-sample sigma per axis (torchio ``RandomBlur``: U(0, 2));
- ``inpaint`` / ``outpaint``: Models Genesis boxes filled with uniform noise (official block sizes and counts);
  the noise spans the sample's own intensity range, since our patches are z-scored rather than in [0, 1];
- ``random_view_affine``: the official loader's view augmentation (torchio ``RandomFlip()`` then
  ``RandomAffine()`` with their defaults), each view on its own draw: a left-right flip with probability 0.5,
  then a rotation of U(-10, 10) degrees about each axis and a zoom of U(0.9, 1.1) along each axis, about the
  centre, linear, padded with the view's minimum (torchio's ``default_pad_value``); in voxel units;
- ``flip_rotate``: flips along each axis and a rot90 in the axial (H, W) plane, described by the official
  7-vector (3 flip bits, one-hot of the number of quarter turns) that conditions the PCRL decoder;
- ``batch_mixup``: convex combination of a batch with a permutation of itself (lambda ~ Beta, folded to >= 0.5).

``Augmentation`` bundles the settings (official defaults) that both tasks expose as factory options.

Random draws use ``generator`` (a CPU ``torch.Generator``; ``None``: the global RNG, which the training loop
seeds and checkpoints, so a resumed run draws the same augmentations).
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from seg.core.augment import gaussian_blur, gaussian_kernels  # noqa: F401 (part of this module's API)
from seg.core.augment import rotation_matrix, sampling_grid
from seg.core.errors import ConfigError, DataError

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, size) per axis D, H, W

#: crop box sizes of the official pair generator, (D, H, W) relative to the output crop (its (x, y, z) sizes
#: (64,64,32), (96,96,48), (96,96,96), (32,32,16), (112,112,64) all resized to (64,64,32)).
OFFICIAL_CROP_SCALES = ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (3.0, 1.5, 1.5), (0.5, 0.5, 0.5), (2.0, 1.75, 1.75))
TRANSFORM_CODE_SIZE = 7


def uniform(generator: torch.Generator | None = None) -> float:
    """One draw from U(0, 1)."""
    return float(torch.rand((), generator=generator))


def randint(low: int, high: int, generator: torch.Generator | None = None) -> int:
    """One integer drawn uniformly from ``low..high`` inclusive (Python's ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes given as ((start, size), ...) per axis."""
    inter = 1
    for (sa, na), (sb, nb) in zip(a, b):
        inter *= max(0, min(sa + na, sb + nb) - max(sa, sb))
    vol_a, vol_b = math.prod(n for _, n in a), math.prod(n for _, n in b)
    return inter / (vol_a + vol_b - inter)


def sample_box_pair(patch_shape, crop_size, scales=OFFICIAL_CROP_SCALES, min_iou: float = 0.25,
                    generator: torch.Generator | None = None, tries: int = 100) -> tuple[Box, Box]:
    """Two crop boxes inside ``patch_shape`` overlapping with IoU > ``min_iou`` (identical after ``tries``)."""

    def one_box():
        scale = scales[randint(0, len(scales) - 1, generator)]
        box = []
        for extent, size, s in zip(patch_shape, crop_size, scale):
            length = min(extent, max(1, round(s * size)))
            box.append((randint(0, extent - length, generator), length))
        return tuple(box)

    first = one_box()
    for _ in range(tries):
        first, second = one_box(), one_box()
        if box_iou(first, second) > min_iou:
            return first, second
    return first, first


def crop_resize(volume: torch.Tensor, box: Box, size) -> torch.Tensor:
    """``volume`` (C, D, H, W) cut to ``box`` and resized trilinearly (align_corners=False) to ``size``."""
    (z, nz), (y, ny), (x, nx) = box
    crop = volume[:, z:z + nz, y:y + ny, x:x + nx]
    if tuple(crop.shape[1:]) == tuple(size):
        return crop.clone()
    return F.interpolate(crop[None], size=tuple(size), mode="trilinear", align_corners=False)[0]


def paired_views(batch: torch.Tensor, crop_size, scales=OFFICIAL_CROP_SCALES, min_iou: float = 0.25,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping random crops of every patch in ``batch``, each resized to ``crop_size``.

    Along an axis where the patch is smaller than ``crop_size``, the crop takes the patch's size.
    """
    size = [min(c, p) for c, p in zip(crop_size, batch.shape[2:])]
    first, second = [], []
    for volume in batch:
        box1, box2 = sample_box_pair(volume.shape[1:], size, scales, min_iou, generator)
        first.append(crop_resize(volume, box1, size))
        second.append(crop_resize(volume, box2, size))
    return torch.stack(first), torch.stack(second)


def _noise(shape, low: float, high: float, like: torch.Tensor, generator) -> torch.Tensor:
    noise = torch.rand(shape, generator=generator, dtype=like.dtype,
                       device="cpu" if generator is not None else like.device)
    return (low + (high - low) * noise).to(like.device)


def _margin_start(extent: int, length: int, generator) -> int:
    margin = min(3, (extent - length) // 2)  # the official code keeps boxes 3 voxels off the border
    return randint(margin, extent - length - margin, generator)


def inpaint(x: torch.Tensor, low: float, high: float, generator: torch.Generator | None = None):
    """Up to 5 boxes of ``x`` (C, D, H, W), each 1/6 to 1/3 of every side, filled with U(low, high) noise
    (each further box drawn with probability 0.95). Returns (painted copy, bool mask (D, H, W) of noise)."""
    out = x.clone()
    mask = torch.zeros(x.shape[1:], dtype=torch.bool, device=x.device)
    count = 5
    while count > 0 and uniform(generator) < 0.95:
        slices = []
        for extent in x.shape[1:]:
            length = randint(max(1, extent // 6), max(1, extent // 3), generator)
            start = _margin_start(extent, length, generator)
            slices.append(slice(start, start + length))
        region = (slice(None), *slices)
        out[region] = _noise(out[region].shape, low, high, x, generator)
        mask[tuple(slices)] = True
        count -= 1
    return out, mask


def outpaint(x: torch.Tensor, low: float, high: float, generator: torch.Generator | None = None):
    """U(low, high) noise everywhere but 1 to 5 kept boxes of ``x`` (C, D, H, W), each 3/7 to 4/7 of every
    side smaller than the volume (the first always, each further one with probability 0.95).
    Returns (painted copy, bool mask (D, H, W) of noise)."""
    out = _noise(x.shape, low, high, x, generator)
    kept = torch.zeros(x.shape[1:], dtype=torch.bool, device=x.device)
    count = 5
    while count == 5 or (count > 0 and uniform(generator) < 0.95):
        slices = []
        for extent in x.shape[1:]:
            length = max(1, extent - randint(3 * extent // 7, 4 * extent // 7, generator))
            start = _margin_start(extent, length, generator)
            slices.append(slice(start, start + length))
        region = (slice(None), *slices)
        out[region] = x[region]
        kept[tuple(slices)] = True
        count -= 1
    return out, ~kept


def corrupt_pair(first: torch.Tensor, second: torch.Tensor, *, blur_rate: float, blur_sigma, paint_rate: float,
                 inpaint_rate: float, generator: torch.Generator | None = None):
    """The low-level corruptions of two views (B, C, D, H, W) of the same patches, in the official order:
    Gaussian blur (each view with probability ``blur_rate``), then with probability ``paint_rate`` per
    sample inpainting (probability ``inpaint_rate``) or else outpainting, the same choice for both views."""
    b = first.shape[0]
    lo, hi = blur_sigma
    views = []
    for view in (first, second):
        sigmas = lo + (hi - lo) * torch.rand(b, 3, generator=generator)
        sigmas[torch.rand(b, generator=generator) >= blur_rate] = 0.0
        views.append(gaussian_blur(view, sigmas.to(view.device)) if bool((sigmas > 0).any()) else view.clone())
    for i in range(b):
        if uniform(generator) >= paint_rate:
            continue
        paint = inpaint if uniform(generator) < inpaint_rate else outpaint
        for view in views:
            low, high = float(view[i].min()), float(view[i].max())
            view[i] = paint(view[i], low, high, generator)[0]
    return views[0], views[1]


def view_affine(x: torch.Tensor, flip: bool, angles, zooms) -> torch.Tensor:
    """One view ``x`` (C, D, H, W) flipped along W (left-right) if ``flip``, then resampled so that the output
    shows it turned by ``angles`` (radians about D, H, W, as ``seg.core.augment.rotation_matrix``) and zoomed by
    ``zooms`` (per axis; > 1 enlarges) about its centre: linear interpolation, padded with its minimum."""
    out = x.flip(-1) if flip else x
    if not any(angles) and all(z == 1 for z in zooms):
        return out
    matrix = rotation_matrix(angles) @ torch.diag(1.0 / torch.tensor(zooms, dtype=torch.float64))
    grid = sampling_grid(tuple(x.shape[1:]), matrix).to(device=x.device, dtype=x.dtype)
    pad = out.amin()
    moved = F.grid_sample((out - pad)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved[0] + pad


def random_view_affine(x: torch.Tensor, flip_rate: float = 0.5, rotation: float = 10.0, scale=(0.9, 1.1),
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Every sample of ``x`` (B, C, D, H, W) through ``view_affine`` with its own draw: a flip with probability
    ``flip_rate``, an angle from U(-``rotation``, ``rotation``) degrees about each axis, a zoom from U(``scale``)
    along each axis (the official loader's torchio ``RandomFlip()`` + ``RandomAffine()``)."""
    out = []
    for sample in x:
        flip = uniform(generator) < flip_rate
        angles = [math.radians(rotation * (2 * uniform(generator) - 1)) for _ in range(3)]
        zooms = [scale[0] + (scale[1] - scale[0]) * uniform(generator) for _ in range(3)]
        out.append(view_affine(sample, flip, angles, zooms))
    return torch.stack(out)


def flip_rotate(x: torch.Tensor, flips, quarter_turns: int) -> torch.Tensor:
    """``x`` (..., D, H, W) flipped along the axes whose entry of ``flips`` (3 bools, D, H, W) is set, then
    rotated by ``quarter_turns`` * 90 degrees in the (H, W) plane, from H towards W."""
    dims = [x.dim() - 3 + axis for axis in range(3) if flips[axis]]
    out = x.flip(dims) if dims else x
    return torch.rot90(out, quarter_turns, dims=(x.dim() - 2, x.dim() - 1))


def unflip_rotate(y: torch.Tensor, flips, quarter_turns: int) -> torch.Tensor:
    """The inverse of ``flip_rotate``."""
    out = torch.rot90(y, -quarter_turns, dims=(y.dim() - 2, y.dim() - 1))
    dims = [y.dim() - 3 + axis for axis in range(3) if flips[axis]]
    return out.flip(dims) if dims else out


def transform_code(flips, quarter_turns: int) -> list[float]:
    """The official 7-vector describing a ``flip_rotate``: 3 flip bits, then one-hot quarter turns."""
    code = [float(bool(f)) for f in flips] + [0.0] * 4
    code[3 + quarter_turns] = 1.0
    return code


def random_flip_rotate(x: torch.Tensor, flip_rate: float = 0.5, generator: torch.Generator | None = None):
    """Every sample of ``x`` (B, C, D, H, W) flipped along each axis with probability ``flip_rate`` and turned
    by 0-3 quarter turns (0 or 2 when H != W). Returns (transformed batch, codes (B, 7))."""
    square = x.shape[-1] == x.shape[-2]
    out, codes = [], []
    for sample in x:
        flips = [uniform(generator) < flip_rate for _ in range(3)]
        turns = int(uniform(generator) // 0.25) if square else 2 * int(uniform(generator) // 0.5)
        out.append(flip_rotate(sample, flips, turns))
        codes.append(transform_code(flips, turns))
    return torch.stack(out), torch.tensor(codes, dtype=x.dtype, device=x.device)


def sample_mixup_lambda(alpha: float = 1.0, generator: torch.Generator | None = None) -> float:
    """lambda ~ Beta(alpha, alpha), folded to max(lambda, 1 - lambda) as in the official code.

    Beta(1, 1) (the official choice) is U(0, 1) and uses ``generator``; other alphas use the global RNG.
    """
    if alpha == 1.0:
        lam = uniform(generator)
    else:
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return max(lam, 1.0 - lam)


def mix(a, b, lam: float):
    """``lam * a + (1 - lam) * b``, elementwise over lists of tensors too."""
    if isinstance(a, (list, tuple)):
        return [mix(x, y, lam) for x, y in zip(a, b)]
    return lam * a + (1.0 - lam) * b


def batch_mixup(x: torch.Tensor, lam: float, order: torch.Tensor) -> torch.Tensor:
    """Mixup of a batch with itself reordered by ``order``: ``lam * x + (1 - lam) * x[order]``."""
    return mix(x, x[order], lam)


def _option_error(task: str, name: str, wanted: str, value) -> ConfigError:
    return ConfigError(f"ssl task {task!r}: option {name} must be {wanted}, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@attrs.frozen
class Augmentation:
    """Augmentation settings of the pretext tasks (defaults: the official PCRL 3D values) and their use."""

    crop_size: tuple[int, int, int] = (32, 64, 64)  # official 64 x 64 x 32 (x, y, z), here (D, H, W)
    crop_scales: tuple = OFFICIAL_CROP_SCALES
    min_crop_iou: float = 0.25
    flip_rate: float = 0.5
    blur_rate: float = 1.0  # torchio RandomBlur() in the official Compose: always, sigma ~ U(0, 2)
    blur_sigma: tuple[float, float] = (0.0, 2.0)
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2  # official config: outpaint_rate 0.8, inpaint_rate = 1 - outpaint_rate
    view_flip_rate: float = 0.5  # torchio RandomFlip(): axis 0 of the official (x, y, z) arrays, W here
    view_rotation: float = 10.0  # torchio RandomAffine(): degrees=10, scales=0.1
    view_scale: tuple[float, float] = (0.9, 1.1)

    @classmethod
    def checked(cls, task: str, **options) -> Augmentation:
        """Settings from factory options (TOML lists allowed; absent ones keep their defaults), or
        ``ConfigError`` naming the bad option."""
        options = {f.name: options.get(f.name, f.default) for f in attrs.fields(cls)}
        size = options["crop_size"]
        if not isinstance(size, (list, tuple)) or len(size) != 3 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
            raise _option_error(task, "crop_size", "three positive integers (D, H, W)", size)
        scales = options["crop_scales"]
        if not isinstance(scales, (list, tuple)) or not scales or not all(
                isinstance(s, (list, tuple)) and len(s) == 3 and all(_number(v) and v > 0 for v in s) for s in scales):
            raise _option_error(task, "crop_scales", "a list of positive (D, H, W) scale triples", scales)
        for name, low_bound in (("blur_sigma", 0.0), ("view_scale", 1e-3)):
            pair = options[name]
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_number(v) for v in pair) \
                    or not low_bound <= pair[0] <= pair[1]:
                raise _option_error(task, name, f"a range [low, high] with {low_bound:g} <= low <= high", pair)
        for name in ("min_crop_iou", "flip_rate", "blur_rate", "paint_rate", "inpaint_rate", "view_flip_rate"):
            value = options[name]
            if not _number(value) or not 0 <= value <= 1:
                raise _option_error(task, name, "a number in [0, 1]", value)
        if not _number(options["view_rotation"]) or not 0 <= options["view_rotation"] <= 180:
            raise _option_error(task, "view_rotation", "a number of degrees in [0, 180]", options["view_rotation"])
        floats = {name: float(options[name]) for name in ("min_crop_iou", "flip_rate", "blur_rate", "paint_rate",
                                                          "inpaint_rate", "view_flip_rate", "view_rotation")}
        return cls(crop_size=tuple(size), crop_scales=tuple(tuple(float(v) for v in s) for s in scales),
                   blur_sigma=tuple(float(v) for v in options["blur_sigma"]),
                   view_scale=tuple(float(v) for v in options["view_scale"]), **floats)

    def augment_views(self, first: torch.Tensor, second: torch.Tensor, generator: torch.Generator | None = None):
        """The official loader's flip and random affine, each view and each sample on its own draw
        (``random_view_affine``)."""
        return tuple(random_view_affine(v, self.view_flip_rate, self.view_rotation, self.view_scale, generator)
                     for v in (first, second))

    def views(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        """Two overlapping crops of every patch (``paired_views``)."""
        return paired_views(batch, self.crop_size, self.crop_scales, self.min_crop_iou, generator)

    def corrupt(self, first: torch.Tensor, second: torch.Tensor, generator: torch.Generator | None = None):
        """Blur and in/outpainting of two views (``corrupt_pair``)."""
        return corrupt_pair(first, second, blur_rate=self.blur_rate, blur_sigma=self.blur_sigma,
                            paint_rate=self.paint_rate, inpaint_rate=self.inpaint_rate, generator=generator)

    def flip_rotate(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Random flips and quarter turns with their codes (``random_flip_rotate``)."""
        return random_flip_rotate(x, self.flip_rate, generator)


def check_batch(task: str, batch: torch.Tensor) -> None:
    """Raise ``DataError`` unless ``batch`` is a float tensor (B, 1, D, H, W)."""
    if batch.dim() != 5 or batch.shape[1] != 1 or not batch.is_floating_point():
        raise DataError(f"ssl task {task!r}: expected a float batch of shape (B, 1, D, H, W), "
                        f"got {batch.dtype} {tuple(batch.shape)}")
