"""What ``seg predict`` segments, not only where: a network whose output is known, run through ``predict_paths``
on phantoms stored in odd orientations and spacings, must give back the phantoms' own label maps.

The phantom is analytic, in physical (LPS, mm) coordinates: a body of 0 HU in air holding four organs, ellipsoids
of different sizes and places, each at its own level (150, 300, 600 and 1200 HU: each twice the one before),
edges blurred like partial volume (sigma 1.5 mm); its label map holds each organ where its signed distance is
negative. Each case samples it at the voxel centres of a grid with permuted, flipped or oblique axes and
anisotropic spacing, so image and ground truth agree by construction, whatever the orientation.

The network (the backbone ``organ_levels``, registered for these tests) knows the organs' levels: a voxel belongs
to the organ whose level is nearest, on a log scale, to the brightest value within 3 voxels, if it is brighter
than half that level (the middle of its edge). On the preprocessed grid that is each organ's true extent, so
every voxel that comes back wrong was moved by the glue: reading, the preprocessing steps and their records, the
sliding window, the inverse mapping or the writing. An axis swap, a flip, a crop offset or a record applied to
the wrong step moves whole organs (Dice far below 0.5 for these off-centre, differently shaped organs); what
resampling there and back costs at the organs' edges is well under 1 % (measured: Dice >= 0.992), hence 0.99.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy.special import ndtr

from seg.core.checkpoint import save_checkpoint
from seg.core.config import experiment_toml, load_experiment
from seg.core.console import set_quiet
from seg.core.metrics import dice
from seg.core.model import describe_backbone
from seg.core.predict import predict_paths
from tests.conftest import extra_plugin

#: label value: (centre, radii) in mm, LPS.
ORGANS = {1: ((-62, -8, 30), (52, 50, 62)), 3: ((66, -12, 40), (46, 44, 55)),
          2: ((-55, 30, -75), (44, 40, 38)), 11: ((58, 25, -72), (50, 36, 40))}
LEVELS = {1: 150.0, 2: 300.0, 3: 600.0, 11: 1200.0}  # HU
BODY_RADII = (125.0, 95.0)  # an elliptic cylinder along z, mm
EDGE_SIGMA = 1.5  # mm
FIELD_OF_VIEW = ((-150.0, 150.0), (-115.0, 115.0), (-135.0, 120.0))  # mm, LPS
HU_PER_UNIT = 1000.0  # clip_zscore with mean 0 and std 1000: the network sees HU / 1000


def _ellipsoid_distance(points, centre, radii) -> np.ndarray:
    """Signed distance (mm, negative inside) to an ellipsoid, to first order near its surface."""
    q = [(p - c) / r for p, c, r in zip(points, centre, radii)]
    rho = np.sqrt(sum(qi**2 for qi in q))
    gradient = np.sqrt(sum((qi / r) ** 2 for qi, r in zip(q, radii))) / np.maximum(rho, 1e-9)
    return (rho - 1) / np.maximum(gradient, 1e-12)


def phantom(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU and label value at physical points (3, N)."""
    x, y, _ = points
    body = _ellipsoid_distance((x, y), (0.0, 0.0), BODY_RADII)
    hu = -1000.0 + 1000.0 * ndtr(-body / EDGE_SIGMA)
    labels = np.zeros(x.shape, np.uint8)
    for value, (centre, radii) in ORGANS.items():
        distance = _ellipsoid_distance(points, centre, radii)
        hu += LEVELS[value] * ndtr(-distance / EDGE_SIGMA)
        labels[distance < 0] = value
    return hu, labels


def sample_phantom(direction, spacing) -> tuple[sitk.Image, sitk.Image]:
    """The phantom's CT (int16) and label map (uint8) on a grid of ``direction`` (9 numbers, columns the index
    axes' physical directions) and ``spacing`` (mm per index axis) that covers FIELD_OF_VIEW."""
    d = np.asarray(direction, float).reshape(3, 3)
    corners = np.array(np.meshgrid(*FIELD_OF_VIEW, indexing="ij")).reshape(3, -1)
    along = d.T @ corners  # the corners' coordinates along each index axis
    size = [int(np.ceil(np.ptp(along[j]) / spacing[j])) for j in range(3)]
    origin = d @ along.min(axis=1)
    index = np.indices(size[::-1]).reshape(3, -1)[::-1]  # x, y, z index of every voxel, array order
    hu, labels = phantom(origin[:, None] + d @ (np.asarray(spacing)[:, None] * index))
    images = []
    for array in (np.rint(hu).astype(np.int16), labels):
        image = sitk.GetImageFromArray(array.reshape(size[::-1]))
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin(origin.tolist())
        image.SetDirection(d.ravel().tolist())
        images.append(image)
    return images[0], images[1]


class OrganLevels(torch.nn.Module):
    """Logits (B, classes, D, H, W) of the organs a phantom image holds, from their known levels (see above)."""

    def __init__(self, in_channels: int, out_channels: int, levels: dict | None = None, reach: int = 3):
        super().__init__()
        items = sorted((int(value), float(level)) for value, level in (levels or {}).items())
        self.register_buffer("values", torch.tensor([value for value, _ in items]))
        self.register_buffer("levels", torch.tensor([level for _, level in items]))
        self.classes, self.reach = out_channels, reach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, r = 2 * self.reach + 1, self.reach
        peak = x
        for kernel, pad in (((k, 1, 1), (r, 0, 0)), ((1, k, 1), (0, r, 0)), ((1, 1, k), (0, 0, r))):
            peak = F.max_pool3d(peak, kernel, 1, pad)  # the brightest value within `reach` voxels
        organ = (peak.clamp_min(1e-3).log()[..., None] - self.levels.log()).abs().argmin(-1)
        labels = torch.where(x > self.levels[organ] / 2, self.values[organ], 0)[:, 0]
        return F.one_hot(labels.long(), self.classes).permute(0, 4, 1, 2, 3).float()


def _register(register):
    register("organ_levels", OrganLevels)


STEPS = [
    '{ name = "crop_body" }',
    '{ name = "resample", options = { in_plane = [160, 160], z_spacing = 2.0 } }',
    '{ name = "reorient" }',
    f'{{ name = "clip_zscore", options = {{ low = -1000.0, high = 3000.0, mean = 0.0, std = {HU_PER_UNIT} }} }}',
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding the organ_levels network (the plugin stays registered for the module's tests)."""
    set_quiet(True)
    levels = ", ".join(f'"{value}" = {level / HU_PER_UNIT}' for value, level in LEVELS.items())
    with extra_plugin("organ_levels_test", register_backbones=_register):
        exp = load_experiment("smoke", (
            f"preprocess=[{', '.join(STEPS)}]", "pretrain=false",
            f'backbone={{ name = "organ_levels", options = {{ levels = {{ {levels} }} }} }}',
            'predict.inferer={ name = "z_sliding_window", options = { window = 32, overlap = 0.5 } }'))
        folder = tmp_path_factory.mktemp("organ_levels") / "run"
        folder.mkdir()
        (folder / "config.toml").write_text(experiment_toml(exp))
        network = OrganLevels(1, 14, exp.backbone.options["levels"])
        save_checkpoint({"kind": "finetune", "backbone": describe_backbone(exp.backbone, 1, 14),
                         "model": network.state_dict(), "epoch": 0,
                         "labels": json.dumps({"background": 0, **{f"organ{v}": v for v in ORGANS}})},
                        folder / "checkpoint_latest.pt")
        yield folder


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


CASES = {
    # index axes: -y (A-P reversed), +z, -x; slices along y at 3.2 mm
    "permuted_flipped": ((0, 0, -1, -1, 0, 0, 0, 1, 0), (3.2, 1.9, 1.7)),
    # RAS on disk, tilted 7 degrees about z, 3 mm slices
    "oblique_ras": (tuple((_rotation_z(7) @ np.diag([-1, -1, 1])).ravel()), (1.6, 1.8, 3.0)),
    # slices first (z reversed), then x, then y reversed: the body axis is index axis 0
    "slices_first": ((0, 1, 0, 0, 0, -1, -1, 0, 0), (4.0, 1.5, 2.1)),
}


def test_predict_gives_back_the_phantoms_organs(run, tmp_path):
    inputs, truth = tmp_path / "in", {}
    inputs.mkdir()
    for name, (direction, spacing) in CASES.items():
        image, labels = sample_phantom(direction, spacing)
        sitk.WriteImage(image, str(inputs / f"{name}_0000.nii.gz"))
        truth[name] = labels
    summary = predict_paths(inputs, tmp_path / "out", run, device="cpu")
    assert summary["done"] == len(CASES) and not summary["failed"]
    scores = {}
    for name, labels in truth.items():
        predicted = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert predicted.GetSize() == labels.GetSize()
        assert np.allclose(predicted.GetOrigin(), labels.GetOrigin())
        assert np.allclose(predicted.GetDirection(), labels.GetDirection())
        assert np.allclose(predicted.GetSpacing(), labels.GetSpacing())
        ours, theirs = sitk.GetArrayFromImage(predicted), sitk.GetArrayFromImage(labels)
        assert set(np.unique(ours)) <= {0, *ORGANS}
        scores[name] = {value: round(dice(ours == value, theirs == value), 4) for value in ORGANS}
    assert all(score >= 0.99 for case in scores.values() for score in case.values()), scores


def test_the_phantom_and_the_network_agree_without_the_glue():
    """The fixed network on the phantom sampled straight onto an LPS grid (no preprocessing to undo): its
    output is the ground truth but for the edges, so what the test above measures is the glue."""
    image, labels = sample_phantom((1, 0, 0, 0, 1, 0, 0, 0, 1), (1.875, 1.44, 2.0))
    network = OrganLevels(1, 14, {str(v): level / HU_PER_UNIT for v, level in LEVELS.items()})
    x = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32) / HU_PER_UNIT)[None, None]
    with torch.no_grad():
        ours = network(x).argmax(1)[0].numpy()
    theirs = sitk.GetArrayFromImage(labels)
    assert {v: dice(ours == v, theirs == v) for v in ORGANS} == pytest.approx({v: 1.0 for v in ORGANS}, abs=0.005)
