"""The phantoms' anatomy: a reference adult abdomen (13 FLARE22 organs, vessels, bowel, muscles, bones, table)
laid out in patient millimetres (LPS: +x the patient's left, +y posterior, +z superior; z = 0 at the renal hila),
scaled, moved and deformed per case by smooth random fields, and painted as HU and labels onto a ``Canvas``,
one slab of an axis-aligned grid at a time. ``seg.core.synth`` chooses the grid and stores the scans."""

from __future__ import annotations

import numpy as np

from seg.core.dataset import FLARE22_LABELS

L = FLARE22_LABELS
#: Reference cavity half-width and half-depth (mm) the anatomy tables are drawn for.
REF_HALF_WIDTH, REF_HALF_DEPTH = 118.0, 80.0

# Ellipsoids: label -> [(centre, radii (side, depth, long), long axis, side axis)] in reference millimetres.
ELLIPSOIDS = {
    "stomach": [((50, -22, 55), (38, 30, 55), (0.35, 0.4, 1), (1, 0, 0)),
                ((18, -50, 22), (22, 22, 35), (-1, -0.2, -0.4), (0, 0, 1))],
    "spleen": [((84, 34, 52), (22, 46, 46), (0.15, -0.35, 1), (0.9, 0.45, 0))],
    "liver": [((-60, -5, 55), (72, 82, 62), (0, 0, 1), (1, 0, 0)),
              ((12, -45, 72), (50, 30, 32), (0, 0, 1), (1, 0.3, 0))],
    "gallbladder": [((-48, -55, 10), (15, 15, 32), (0.2, -0.5, 1), (1, 0, 0))],
    "right_kidney": [((-68, 40, -8), (26, 23, 52), (0.15, 0.2, 1), (0.85, -0.5, 0))],
    "left_kidney": [((68, 40, 5), (26, 23, 52), (-0.15, 0.2, 1), (-0.85, -0.5, 0))],
    "right_adrenal_gland": [((-34, 38, 60), (4, 14, 17), (0.2, 0, 1), (1, 0, 0))],
    "left_adrenal_gland": [((38, 30, 50), (4, 14, 17), (-0.2, 0, 1), (1, 0, 0))],
}
# Tubes: label -> polyline of (x, y, z, radius) in reference millimetres.
TUBES = {
    "pancreas": [(-22, -28, -8, 15), (-5, -34, 8, 12), (20, -30, 20, 11), (55, 5, 32, 10), (72, 26, 38, 8)],
    "duodenum": [(5, -48, 16, 12), (-22, -40, 20, 12), (-42, -22, 5, 12), (-44, -18, -30, 12),
                 (-20, -28, -46, 12), (12, -30, -44, 12), (26, -24, -22, 11)],
    "esophagus": [(36, -22, 70, 7), (12, -14, 88, 6.5), (2, 0, 120, 6.5), (0, 0, 160, 6.5), (-2, 0, 420, 6.5)],
    "inferior_vena_cava": [(-20, -2, -130, 10), (-24, -2, -20, 11), (-26, 4, 40, 12), (-24, 6, 90, 12),
                           (-14, 0, 125, 13), (-8, -12, 140, 12)],
    "aorta": [(10, -4, -120, 9), (14, -4, -40, 10), (16, 2, 50, 11), (24, 6, 110, 12), (32, 14, 170, 13),
              (30, 14, 420, 13)],
}
# Vessels without a label (drawn bright, label 0): splenic + portal vein, renal veins, iliac vessels.
OTHER_VESSELS = [
    ("portal", [(70, 28, 36, 5), (40, 0, 24, 6), (5, -22, 10, 7), (-18, -22, 30, 7), (-35, -15, 48, 6)]),
    ("vein", [(-48, 28, -5, 5), (-26, 0, -2, 5)]),
    ("vein", [(48, 24, 2, 5), (14, -19, 0, 5), (-20, -6, -2, 5)]),
    ("artery", [(10, -4, -120, 8), (45, 0, -200, 6), (70, 5, -270, 5)]),
    ("artery", [(10, -4, -120, 8), (-35, 0, -200, 6), (-60, 5, -270, 5)]),
    ("vein", [(-20, -2, -130, 9), (-45, 8, -200, 7), (-65, 12, -270, 6)]),
    ("vein", [(-20, -2, -130, 8), (40, 10, -200, 7), (62, 14, -270, 6)]),
]
# Painting order: later organs cover earlier ones where shapes touch (the liver is indented by the kidney...).
ORGAN_ORDER = ["stomach", "spleen", "liver", "gallbladder", "right_kidney", "left_kidney", "right_adrenal_gland",
               "left_adrenal_gland", "pancreas", "duodenum", "esophagus", "inferior_vena_cava", "aorta"]
# Boundary deformation (relative to the radius, per unit of the smooth shape field).
WOBBLE = {"liver": 0.12, "spleen": 0.12, "stomach": 0.12, "right_kidney": 0.06, "left_kidney": 0.06,
          "gallbladder": 0.08, "pancreas": 0.15, "duodenum": 0.1, "esophagus": 0.08, "inferior_vena_cava": 0.06,
          "aorta": 0.03, "right_adrenal_gland": 0.1, "left_adrenal_gland": 0.1}
# Organs that stay below the diaphragm.
ABDOMINAL = {"stomach", "spleen", "liver", "gallbladder", "right_kidney", "left_kidney", "right_adrenal_gland",
             "left_adrenal_gland", "pancreas", "duodenum"}


class SmoothField:
    """A smooth random field of unit variance: Gaussian bumps of width ``scale`` on a lattice of N(0,1)."""

    def __init__(self, rng: np.random.Generator, lo, hi, scale: float):
        self.scale = scale
        self.lattice = [np.arange(a - 3 * scale, b + 4 * scale, scale) for a, b in zip(lo, hi)]
        self.values = rng.standard_normal([len(a) for a in self.lattice[::-1]]).astype(np.float32)

    def _weights(self, coords, lattice):
        """(len(coords) x len(lattice)) Gaussian weights cut at 4 widths, rows of unit norm (unit variance)."""
        d = (coords[:, None] - lattice[None, :]) / self.scale
        w = np.where(np.abs(d) < 4, np.exp(-0.5 * d**2), 0.0)
        norm = np.sqrt((w**2).sum(1, keepdims=True))
        return (w / np.maximum(norm, 1e-12)).astype(np.float32)  # 0 beyond the lattice

    def sample(self, xs, ys, zs) -> np.ndarray:
        """Values on the grid ``zs x ys x xs`` (array indexed z, y, x): separable matrix products, one axis
        at a time."""
        wx, wy, wz = (self._weights(np.asarray(c, float), g) for c, g in zip((xs, ys, zs), self.lattice))
        (cz, cy, cx), (nz, ny, nx) = self.values.shape, (len(zs), len(ys), len(xs))
        out = wx @ self.values.reshape(-1, cx).T                                   # (nx, cz * cy)
        out = wy @ out.reshape(nx, cz, cy).transpose(2, 1, 0).reshape(cy, -1)      # (ny, cz * nx)
        out = wz @ out.reshape(ny, cz, nx).transpose(1, 0, 2).reshape(cz, -1)      # (nz, ny * nx)
        return out.reshape(nz, ny, nx)


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur along every axis, edges repeated, taps to ``round(4 sigma)`` (float32; the
    result of ``scipy.ndimage.gaussian_filter(array, sigma, mode="nearest")``)."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = np.asarray(array, dtype=np.float32)
    for axis in range(out.ndim):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(out.ndim)], mode="edge")
        n = out.shape[axis]
        out = sum(w * padded.take(np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return out


def _frame(long_axis, side_axis) -> np.ndarray:
    """Rows: unit side, depth and long axes (orthonormal, right-handed)."""
    long = np.asarray(long_axis, float) / np.linalg.norm(long_axis)
    side = np.asarray(side_axis, float) - np.dot(side_axis, long) * long
    side /= np.linalg.norm(side)
    return np.stack([side, np.cross(long, side), long])


class Canvas:
    """HU and label arrays over one slab of the axis-aligned grid, with the smooth fields sampled on it."""

    def __init__(self, xs, ys, zs, fields: dict[str, SmoothField]):
        self.xs, self.ys, self.zs = xs, ys, zs
        self.X, self.Y, self.Z = xs[None, None, :], ys[None, :, None], zs[:, None, None]
        self.fields = {name: field.sample(xs, ys, zs) for name, field in fields.items()}
        self.hu = np.full((len(zs), len(ys), len(xs)), -1000.0, np.float32)
        self.label = np.zeros(self.hu.shape, np.uint8)

    def box(self, lo, hi):
        """Index slices (z, y, x) of the voxels inside the millimetre box [lo, hi], or None if empty."""
        slices = []
        for coords, a, b in zip((self.zs, self.ys, self.xs), lo[::-1], hi[::-1]):
            step = coords[1] - coords[0] if len(coords) > 1 else 1.0
            i0 = max(0, int(np.ceil((a - coords[0]) / step)))
            i1 = min(len(coords), int(np.floor((b - coords[0]) / step)) + 1)
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
        return tuple(slices)

    def paint(self, box, mask, hu: float, texture: float, label: int | None = 0) -> None:
        """Set HU (``hu`` plus ``texture`` times the fine texture field) and, unless None, the label."""
        view = self.hu[box]
        view[mask] = hu + texture * self.fields["texture"][box][mask]
        if label is not None:
            self.label[box][mask] = label


def _ellipsoid_level(c: Canvas, centre, radii, frame, wobble: float):
    """(box, level) of a deformed ellipsoid: level < 1 inside, about 0 at the centre."""
    reach = max(radii) * (1 + 1.5 * wobble) + 2
    box = c.box(np.subtract(centre, reach), np.add(centre, reach))
    if box is None:
        return None, None
    d = (c.X[..., box[2]] - centre[0], c.Y[:, box[1]] - centre[1], c.Z[box[0]] - centre[2])
    q = sum(((frame[k, 0] * d[0] + frame[k, 1] * d[1] + frame[k, 2] * d[2]) / radii[k]) ** 2 for k in range(3))
    return box, np.sqrt(q) - wobble * c.fields["shape"][box]


def _tube_level(c: Canvas, points, wobble: float):
    """(box, level) of a deformed tube around a polyline of (x, y, z, radius): level < 1 inside."""
    pts = np.asarray(points, float)
    reach = pts[:, 3].max() * (1 + 1.5 * wobble) + 2
    box = c.box(pts[:, :3].min(0) - reach, pts[:, :3].max(0) + reach)
    if box is None:
        return None, None
    p = (c.X[..., box[2]], c.Y[:, box[1]], c.Z[box[0]])
    level = np.full(tuple(s.stop - s.start for s in box), np.inf, np.float32)
    for a, b in zip(pts[:-1], pts[1:]):
        ab = b[:3] - a[:3]
        t = sum((p[k] - a[k]) * ab[k] for k in range(3)) / max(float(ab @ ab), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        d2 = sum((p[k] - a[k] - t * ab[k]) ** 2 for k in range(3))
        np.minimum(level, np.sqrt(d2) / (a[3] + t * (b[3] - a[3])), out=level)
    return box, level - wobble * c.fields["shape"][box]


def _union(c: Canvas, shapes):
    """(box, level) of the union of shapes given as (box, level) pairs (None, None where off the grid)."""
    shapes = [(b, v) for b, v in shapes if b is not None]
    if not shapes:
        return None, None
    box = tuple(slice(min(b[k].start for b, _ in shapes), max(b[k].stop for b, _ in shapes)) for k in range(3))
    level = np.full(tuple(s.stop - s.start for s in box), np.inf, np.float32)
    for b, v in shapes:
        inner = tuple(slice(b[k].start - box[k].start, b[k].stop - box[k].start) for k in range(3))
        np.minimum(level[inner], v, out=level[inner])
    return box, level


def _tissues(rng: np.random.Generator) -> dict[str, float]:
    """Per-case HU of every tissue (portal-venous contrast phase, enhancement scaled by ``contrast``)."""
    u = rng.uniform
    contrast = u(0.7, 1.3)
    hu = {"fat": u(-115, -85), "muscle": u(40, 60), "lung": u(-880, -820), "gallbladder": u(0, 25),
          "liver": 55 + 50 * contrast + u(-8, 8), "kidney_cortex": 60 + 130 * contrast,
          "kidney_medulla": 40 + 70 * contrast, "adrenal": u(35, 60) + 15 * contrast,
          "aorta": 70 + 150 * contrast + u(-20, 40), "esophagus": u(35, 60), "gut_wall": u(55, 95),
          "bone": u(150, 280), "cortex": u(500, 900), "disc": u(70, 100), "csf": u(5, 15), "urine": u(5, 20),
          "table": u(150, 300)}
    hu["visceral_fat"] = hu["fat"] + u(0, 15)
    hu["spleen"] = hu["liver"] + u(-5, 25)
    hu["pancreas"] = hu["liver"] + u(-25, 5)
    hu["vein"] = hu["inferior_vena_cava"] = hu["liver"] + u(15, 60)
    hu["portal"] = hu["liver"] + u(30, 70)
    hu["artery"] = hu["aorta"]
    hu["heart"] = 0.8 * hu["aorta"]
    hu["contents"] = u(150, 300) if rng.random() < 0.2 else u(5, 30)  # oral contrast in some cases
    return hu


class Phantom:
    """One patient: body, tissues and organ shapes drawn from ``rng`` (millimetres, body centre at x = y = 0)."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.a_in, self.b_in = u(100, 130), u(68, 90)   # abdominal cavity half-width, anterior half-depth
        self.b_post = self.b_in * u(1.1, 1.2)            # posterior half-depth: spine and back muscles inside
        self.fat, self.muscle = u(8, 40), u(8, 14)
        self.scale = np.array([self.a_in / REF_HALF_WIDTH, self.b_in / REF_HALF_DEPTH, u(0.9, 1.1)])
        size = np.sqrt(self.scale[0] * self.scale[1]) * u(0.9, 1.1)
        self.hu = _tissues(rng)
        self.ellipsoids = {}
        for name, parts in ELLIPSOIDS.items():
            shift, grow = np.clip(rng.normal(0, 3, 3), -6, 6), size * u(0.88, 1.12)
            self.ellipsoids[name] = [(np.multiply(c, self.scale) + shift, np.multiply(r, grow * u(0.92, 1.08, 3)),
                                      _frame(long, side)) for c, r, long, side in parts]
        self.tubes = {name: self._polyline(rng, pts) for name, pts in TUBES.items()}
        self.vessels = [(kind, self._polyline(rng, pts)) for kind, pts in OTHER_VESSELS]
        self.domes = (105 * self.scale[2] + u(-8, 8), 95 * self.scale[2] + u(-8, 8))
        self.spine_y, self.spine_r = 0.36 * self.b_in + u(-3, 3), u(19, 24)
        self.disc_period, self.disc_phase = u(30, 38), u(0, 40)
        self.rib_period, self.rib_phase = u(24, 30), u(0, 30)
        self.gas_fraction, self.bowel_gas = u(0.0, 0.35), u(1.3, 2.2)
        self.table_gap = u(5, 25) if rng.random() < 0.6 else None

    def _polyline(self, rng, points) -> np.ndarray:
        pts = np.array(points, float)
        pts[:, :3] = pts[:, :3] * self.scale + np.clip(rng.normal(0, 2.5, 3), -5, 5)
        pts[:, 3] *= rng.uniform(0.9, 1.1)
        return pts

    def _ratio(self, c: Canvas, a, b_ant, b_post) -> np.ndarray:
        """Normalised radius of an elliptic cross-section (flatter at the back); 1 on its outline, 2D (y, x)."""
        y = c.Y[0]
        back = np.abs(np.maximum(y, 0) / b_post) ** 2.6
        return np.sqrt((c.X[0] / a) ** 2 + np.where(y < 0, (y / b_ant) ** 2, back))

    def render(self, c: Canvas) -> None:
        """Paint the whole phantom onto ``c``: body and background tissues, then organs, then the spine."""
        hu, outline = self.hu, 0.03 * c.fields["shape"]
        grow = self.fat + self.muscle
        body = self._ratio(c, self.a_in + grow, self.b_in + grow, self.b_post + grow) - outline < 1
        wall = self._ratio(c, self.a_in + self.muscle, self.b_in + self.muscle, self.b_post + self.muscle) - outline < 1
        cavity = self._ratio(c, self.a_in, self.b_in, self.b_post) - outline < 1
        everywhere = (slice(None),) * 3
        c.paint(everywhere, body, hu["fat"], 10)
        c.paint(everywhere, wall & ~cavity, hu["muscle"], 6)
        c.paint(everywhere, cavity, hu["visceral_fat"], 10)
        self._table(c)
        back = 35 * (np.maximum(c.Y[0], 0) / self.b_in) ** 2
        domes = [z - 45 * ((c.X[0] - x) / (0.6 * self.a_in)) ** 2 - back
                 for x, z in zip((-0.4 * self.a_in, 0.4 * self.a_in), self.domes)]
        thorax = c.Z > np.maximum(*domes)  # above the diaphragm
        abdomen = cavity & ~thorax
        self._bowel(c, abdomen)
        mediastinum = (np.abs(c.X[0] - 5 * self.scale[0]) < 28) & (c.Y[0] > -0.9 * self.b_in)
        c.paint(everywhere, cavity & thorax & ~mediastinum, hu["lung"], 25)
        heart = (15 * self.scale[0], -48 * self.scale[1], max(self.domes) + 55)
        box, level = _ellipsoid_level(c, heart, (60, 42, 50), np.eye(3), 0.05)
        if box is not None:
            c.paint(box, (level < 1) & cavity[box] & thorax[box], hu["heart"], 10)
        self._muscles_and_ribs(c, cavity)
        for kind, pts in self.vessels:
            self._tube(c, pts, kind, 0, cavity)
        for name in ORGAN_ORDER:
            keep = abdomen if name in ABDOMINAL else cavity
            if name in TUBES:
                self._tube(c, self.tubes[name], name, L[name], keep)
            else:
                self._organ(c, name, keep)
        box, level = _tube_level(c, self.vessels[0][1], 0.05)  # portal vein branches inside the liver
        if box is not None:
            c.paint(box, (level < 1) & (c.label[box] == L["liver"]), hu["portal"], 6, None)
        self._spine(c)
        self._pelvis(c, cavity)

    def _organ(self, c: Canvas, name: str, keep) -> None:
        """An organ made of deformed ellipsoids (their union); kidneys get cortex, medulla and a sinus, the
        stomach a wall, contents and a gas cap (anterior: the patient lies supine)."""
        hu, parts = self.hu, self.ellipsoids[name]
        box, level = _union(c, [_ellipsoid_level(c, centre, radii, frame, WOBBLE[name])
                                for centre, radii, frame in parts])
        if box is None:
            return
        inside = (level < 1) & keep[box]
        centre, radii, frame = parts[0]
        if name.endswith("kidney"):
            c.paint(box, inside, hu["kidney_cortex"], 8, L[name])
            c.paint(box, inside & (level < 0.6), hu["kidney_medulla"], 8, L[name])
            sinus_box, sinus = _ellipsoid_level(c, centre + 0.75 * radii[0] * frame[0], (12, 11, 20), frame, 0.05)
            if sinus_box is not None:
                c.paint(sinus_box, (sinus < 1) & (c.label[sinus_box] == L[name]), hu["fat"] + 30, 10)
        elif name == "stomach":
            c.paint(box, inside, hu["gut_wall"], 8, L[name])
            lumen = inside & (level < 0.82)
            c.paint(box, lumen, hu["contents"], 6, L[name])
            gas_level = centre[1] - radii[1] * (1 - 2 * self.gas_fraction)
            c.paint(box, lumen & (c.Y[:, box[1]] < gas_level), -950, 10, L[name])
        else:
            c.paint(box, inside, hu["adrenal" if "adrenal" in name else name], 7, L[name])

    def _tube(self, c: Canvas, pts, tissue: str, label: int, keep) -> None:
        """A tube of ``tissue`` (the duodenum with a wall and contents), inside ``keep``."""
        box, level = _tube_level(c, pts, WOBBLE.get(tissue, 0.05))
        if box is None:
            return
        inside = (level < 1) & keep[box]
        if tissue == "duodenum":
            c.paint(box, inside, self.hu["gut_wall"], 8, label)
            c.paint(box, inside & (level < 0.6), self.hu["contents"], 6, label)
        else:
            c.paint(box, inside, self.hu[tissue], 7, label)

    def _table(self, c: Canvas) -> None:
        """The scanner table under the patient's back: a curved plate, in some cases."""
        if self.table_gap is None:
            return
        top = self.b_post + self.fat + self.muscle + self.table_gap - 0.0015 * c.X[0] ** 2
        plate = (c.Y[0] > top) & (c.Y[0] < top + 5) & (np.abs(c.X[0]) < 1.4 * self.a_in)
        c.paint((slice(None),) * 3, np.broadcast_to(plate, c.hu.shape), self.hu["table"], 20)

    def _bowel(self, c: Canvas, abdomen) -> None:
        """Unlabeled bowel loops in the lower abdomen: enhancing wall, fluid, gas pockets."""
        reach = 20 * self.scale[2] + 45 * np.abs(c.X) / self.a_in  # colon flexures sit higher, at the sides
        region = abdomen & (c.Z < reach)
        loops = c.fields["bowel"]
        c.paint((slice(None),) * 3, region & (loops > 0.0), self.hu["gut_wall"], 10)
        lumen = region & (loops > 0.3)
        c.paint((slice(None),) * 3, lumen, self.hu["contents"] if self.hu["contents"] < 100 else 20, 10)
        c.paint((slice(None),) * 3, lumen & (c.fields["texture"] > self.bowel_gas), -950, 10)

    def _muscles_and_ribs(self, c: Canvas, cavity) -> None:
        """Back muscles either side of the spine, psoas muscles (growing downwards), ribs above the waist."""
        sx, everywhere = self.scale[0], (slice(None),) * 3
        y0 = self.spine_y
        for side in (-1, 1):
            back = ((c.X[0] - side * 32 * sx) / 24) ** 2 + ((c.Y[0] - y0 - 44) / 18) ** 2 < 1
            c.paint(everywhere, np.broadcast_to(back, c.hu.shape) & cavity, self.hu["muscle"], 6)
            radius = 4 + 12 * np.clip((20 - c.Z) / 150, 0, 1)
            psoas = ((c.X - side * 40 * sx) ** 2 + (c.Y - y0 - 4) ** 2 < radius**2) & (c.Z < 20)
            c.paint(everywhere, psoas, self.hu["muscle"], 6)
        ring = self._ratio(c, self.a_in + 10, self.b_in + 10, self.b_post + 10)
        shell = (self._ratio(c, self.a_in, self.b_in, self.b_post) > 0.99) & (ring < 1)
        shell &= ~((np.abs(c.X[0]) < 0.35 * self.a_in) & (c.Y[0] < 0))  # no ribs in front of the sternum gap
        band = np.mod(c.Z - 0.3 * c.Y - self.rib_phase, self.rib_period) < 9
        c.paint(everywhere, shell & band & (c.Z > -35 * self.scale[2] - 0.3 * c.Y), self.hu["bone"] + 150, 40)

    def _spine(self, c: Canvas) -> None:
        """Vertebrae (cortex, marrow, discs), spinal canal and posterior arches along the whole scan."""
        hu, y0, r, everywhere = self.hu, self.spine_y, self.spine_r, (slice(None),) * 3
        distance = np.sqrt(c.X[0] ** 2 + (c.Y[0] - y0) ** 2)
        canal_y = y0 + r + 9
        canal = np.sqrt(c.X[0] ** 2 + (c.Y[0] - canal_y) ** 2)
        arch = ((canal < 16) & (c.Y[0] > canal_y - 4)) | ((np.abs(c.X[0]) < 5) & (c.Y[0] > canal_y)
                                                           & (c.Y[0] < canal_y + 30))
        arch |= (np.abs(c.Y[0] - canal_y + 4) < 5) & (np.abs(c.X[0]) < 32)  # transverse processes
        disc = np.mod(c.Z - self.disc_phase, self.disc_period) < 7
        bone = np.broadcast_to((distance < r) | arch, c.hu.shape)
        c.paint(everywhere, bone & ~disc, hu["cortex"], 50)
        c.paint(everywhere, np.broadcast_to(distance < r - 2.5, c.hu.shape) & ~disc, hu["bone"], 30)
        c.paint(everywhere, np.broadcast_to(distance < r, c.hu.shape) & disc, hu["disc"], 8)
        c.paint(everywhere, np.broadcast_to(canal < 8, c.hu.shape), hu["csf"], 5)

    def _pelvis(self, c: Canvas, cavity) -> None:
        """Iliac wings and the bladder, where the scan reaches that low."""
        sx, sy, sz = self.scale
        for side in (-1, 1):
            box, level = _ellipsoid_level(c, (side * 88 * sx, 30 * sy, -215 * sz), (12, 48, 55),
                                          _frame((side * 0.3, 0, 1), (1, 0, 0)), 0.03)
            if box is not None:
                c.paint(box, level < 1, self.hu["cortex"] - 200, 60)
        box, level = _ellipsoid_level(c, (0, -40 * sy, -270 * sz), (45, 35, 30), np.eye(3), 0.05)
        if box is not None:
            c.paint(box, (level < 1) & cavity[box], self.hu["urine"], 5)
