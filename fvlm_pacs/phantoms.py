"""Synthetic chest CT phantoms with exact anatomy label maps, abnormalities and reports.

No real CT can be downloaded here, so training, evaluation and the demo run on phantoms made on
the spot. Each case is a non-contrast chest CT volume in Hounsfield units with

* anatomy: body (skin fat, chest wall muscle), two lungs with a vessel and airway tree, heart with
  epicardial fat, aorta (ascending, arch, descending), trachea and main bronchi, esophagus with an
  air lumen, spine (vertebral bodies, discs, canal, posterior elements), ribs and costal cartilage,
  sternum, upper abdomen (liver, stomach with gas, spleen) below the diaphragm domes; sizes and
  positions vary per case;
* an exact label map of the fVLM CT-RATE anatomies (``mappings/anatomies.yaml`` profile
  ``ct-rate``): 0 background, 1 lung, 2 heart, 3 esophagus, 4 aorta; everything else is 0;
* abnormalities tied to their anatomy, with random location and severity, drawn from a small prior
  in which findings co-occur as in patients (smoking → emphysema, nodules, bronchial wall
  thickening; heart failure → cardiomegaly, pleural/pericardial effusion, septal thickening,
  ground glass; infection → consolidation, opacity, effusion; age → calcifications, hiatal hernia);
* a CT-RATE style report ("Findings: ..." / "Impression: ...") with varied wording and synonyms;
  anatomies without findings never appear in the impression;
* per-finding labels for all 16 CT-RATE findings (:data:`FINDINGS`); every one is simulated
  (:data:`SIMULATED`).

Geometry (documented because the model depends on it): arrays are indexed (slice, row, column).
Slice index k runs **feet → head** (+z of LPS, the order :func:`fvlm_pacs.studies.assembly.
assemble_study` produces for an axial series), rows run anterior → posterior (+y), columns run
patient right → left (+x). :attr:`Case.affine` maps (k, row, column, 1) to LPS millimetres.

Modelling decisions:

* Pleural effusion is pleural fluid, not lung: it lies in the dependent hemithorax next to the lung
  (inside the lung's bounding box) but carries label 0, as a whole-body segmenter would leave it.
  Pericardial effusion likewise lies outside the heart label, between the heart and its fat.
* A hiatal hernia is drawn as a sac at the lower end of the esophagus, just above the diaphragm,
  and labelled esophagus (the finding belongs to the esophagus anatomy in fVLM; a real segmenter
  might call part of it stomach).
* Calcifications lie inside their anatomy's label (aortic wall plaques in the aorta, coronary
  plaques on the heart surface inside the heart label).
* Findings are sized for the model's 3 × 1 × 1 mm grid: nodules 5–20 mm, effusions several mm
  thick, plaques ≥ 2 mm; HU contrasts are realistic (ground glass ≈ −550, consolidation ≈ 30,
  fluid 5–20, calcium 350–1000), not exaggerated. Gaussian noise (10–20 HU, slightly correlated
  in-plane) is added after a small in-plane blur that mimics partial volume.
* Bones are drawn after the organs but never inside the heart, aorta or esophagus labels: a
  segmenter does not call bone heart, and bone inside the heart label has the density of a
  coronary plaque.
* Calcified plaques are drawn after that blur, each voxel moved toward the plaque's HU by the
  fraction of its volume the plaque covers: a voxel-centre test would make a 4 mm plaque on the
  benchmark's 6 × 2.5 × 2.5 mm grid one full voxel or none, and the blur would then leave it near
  200 HU, inside the aorta's noise and bone spill; by its partial volume it stays 450–650 HU, as
  thick slices show such a plaque.
* Randomness: one :class:`numpy.random.SeedSequence` per case seed, spawned into independent
  streams (prior, anatomy, each finding, noise, report). Forcing a finding on or off with
  ``make_case(seed, force=...)`` therefore leaves the anatomy, the noise and the other findings
  of that seed unchanged.

Writing: :func:`write_case` stores ``case.npz`` (``hu`` as int16 HU, ``labels``, ``affine``),
``report.txt`` and ``labels.json``; with ``dicom=True`` a CT series (via
:func:`fvlm_pacs.synthetic.ct_series`, HU through Rescale Slope/Intercept) and with ``seg=True`` a
DICOM SEG of the four anatomies coded as in ``mappings/anatomies.yaml``. :func:`write_dataset`
writes many cases and a ``manifest.csv``; ``fvlm-pacs synth`` is its command line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ANATOMY_LABELS",
    "FINDINGS",
    "FINDING_ANATOMY",
    "SIMULATED",
    "SYNONYMS",
    "Case",
    "PhantomSpec",
    "make_case",
    "write_case",
    "write_dataset",
]

ANATOMY_LABELS: dict[str, int] = {"lung": 1, "heart": 2, "esophagus": 3, "aorta": 4}
"""Label map values, as in the ``ct-rate`` profile of ``mappings/anatomies.yaml``."""

FINDINGS: tuple[str, ...] = (
    "emphysema",
    "atelectasis",
    "lung_nodule",
    "lung_opacity",
    "pulmonary_fibrotic_sequela",
    "pleural_effusion",
    "mosaic_attenuation_pattern",
    "peribronchial_thickening",
    "consolidation",
    "bronchiectasis",
    "interlobular_septal_thickening",
    "cardiomegaly",
    "pericardial_effusion",
    "coronary_artery_wall_calcification",
    "hiatal_hernia",
    "arterial_wall_calcification",
)
"""The 16 CT-RATE findings, in the order of ``mappings/findings.yaml``."""

FINDING_ANATOMY: dict[str, str] = {
    **{f: "lung" for f in FINDINGS[:11]},
    "cardiomegaly": "heart",
    "pericardial_effusion": "heart",
    "coronary_artery_wall_calcification": "heart",
    "hiatal_hernia": "esophagus",
    "arterial_wall_calcification": "aorta",
}

SIMULATED: tuple[str, ...] = FINDINGS
"""Findings the phantom draws (all 16)."""

SYNONYMS: dict[str, tuple[str, ...]] = {
    "emphysema": ("emphysema", "emphysematous"),
    "atelectasis": ("atelectasis", "atelectatic"),
    "lung_nodule": ("nodule", "nodular lesion"),
    "lung_opacity": ("ground-glass", "ground glass", "opacity", "opacities"),
    "pulmonary_fibrotic_sequela": ("fibrotic", "fibrosis"),
    "pleural_effusion": ("pleural effusion", "pleural fluid"),
    "mosaic_attenuation_pattern": ("mosaic",),
    "peribronchial_thickening": ("peribronchial thickening", "bronchial wall thickening"),
    "consolidation": ("consolidation", "consolidative"),
    "bronchiectasis": ("bronchiectasis", "bronchiectatic"),
    "interlobular_septal_thickening": ("septal thickening", "thickened interlobular septa"),
    "cardiomegaly": ("cardiomegaly", "cardiac enlargement", "enlarged heart"),
    "pericardial_effusion": ("pericardial effusion", "pericardial fluid"),
    "coronary_artery_wall_calcification": ("coronary",),
    "hiatal_hernia": ("hiatal hernia", "hiatus hernia"),
    "arterial_wall_calcification": (
        "aortic wall calcification",
        "calcification of the aort",
        "calcified aortic plaque",
        "aortic atherosclero",
    ),
}
"""Terms (lower case) of which every report phrase for a present finding contains one."""

ANATOMY_TERMS: dict[str, tuple[str, ...]] = {
    "lung": (
        "lung",
        "pulmonary",
        "pleural",
        "lobe",
        "bronch",
        "emphysem",
        "nodul",
        "atelecta",
        "consolidat",
        "opacit",
        "ground",
        "fibro",
        "mosaic",
        "septa",
    ),
    "heart": ("heart", "cardi", "coronary"),
    "esophagus": ("esophag", "hiatal", "hiatus"),
    "aorta": ("aort",),
}
"""Words that place an impression sentence on an anatomy (used by the tests)."""


@dataclass(frozen=True)
class PhantomSpec:
    """Grid of a phantom: ``shape`` (slices, rows, columns) and ``spacing`` in mm (slice, row,
    column). The default covers 288 × 240 × 336 mm, a typical chest field of view; smaller grids
    shrink the anatomy to fit."""

    shape: tuple[int, int, int] = (96, 160, 224)
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)
    noise_hu: tuple[float, float] = (10.0, 20.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape: need three sizes >= 8, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing: need three positive values, got {self.spacing}")

    @property
    def affine(self) -> np.ndarray:
        """(k, row, column, 1) → LPS mm; the grid is centred on the origin."""
        d, h, w = self.shape
        sz, sy, sx = self.spacing
        a = np.zeros((4, 4))
        a[2, 0] = sz
        a[1, 1] = sy
        a[0, 2] = sx
        a[:3, 3] = (-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, -(d - 1) / 2 * sz)
        a[3, 3] = 1.0
        return a


@dataclass
class Case:
    """One phantom: HU volume, anatomy label map, finding labels and the report."""

    seed: int
    hu: np.ndarray  # float32 [slices, rows, columns]
    labels: np.ndarray  # uint8, same shape
    affine: np.ndarray  # 4×4, (k, row, column) → LPS mm
    spacing: tuple[float, float, float]
    findings: dict[str, bool]
    severity: dict[str, float]
    report_findings: str
    report_impression: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> str:
        return f"Findings: {self.report_findings}\n\nImpression: {self.report_impression}\n"


# ---------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------


class _Grid:
    """Voxel-centre coordinates in mm: x patient left (+), y posterior (+), z head (+)."""

    def __init__(self, spec: PhantomSpec) -> None:
        self.shape = spec.shape
        d, h, w = spec.shape
        sz, sy, sx = spec.spacing
        self.sp = np.array(spec.spacing)
        self.zc = (np.arange(d) - (d - 1) / 2) * sz
        self.yc = (np.arange(h) - (h - 1) / 2) * sy
        self.xc = (np.arange(w) - (w - 1) / 2) * sx
        self.z = self.zc[:, None, None]
        self.y = self.yc[None, :, None]
        self.x = self.xc[None, None, :]
        self.y2 = self.yc[:, None]
        self.x2 = self.xc[None, :]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in [lo, hi] (z, y, x mm)."""
        out = []
        for coords, a, b in zip((self.zc, self.yc, self.xc), lo, hi, strict=True):
            i0 = int(np.searchsorted(coords, a, "left"))
            i1 = int(np.searchsorted(coords, b, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return (out[0], out[1], out[2])

    def local(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            self.zc[sl[0]][:, None, None],
            self.yc[sl[1]][None, :, None],
            self.xc[sl[2]][None, None, :],
        )

    def snap(self, p: np.ndarray) -> np.ndarray:
        """The voxel centre nearest to p (z, y, x)."""
        out = []
        for coords, v in zip((self.zc, self.yc, self.xc), p, strict=True):
            out.append(coords[int(np.argmin(np.abs(coords - v)))])
        return np.array(out)


Region = tuple[tuple[slice, slice, slice], np.ndarray]


def _capsule(g: _Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> Region | None:
    """Tapered tube from p0 (radius r0) to p1 (radius r1); points are (z, y, x) mm."""
    r = max(r0, r1)
    sl = g.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
    if sl is None:
        return None
    z, y, x = g.local(sl)
    d = p1 - p0
    dd = float(d @ d) or 1e-9
    t = np.clip(((z - p0[0]) * d[0] + (y - p0[1]) * d[1] + (x - p0[2]) * d[2]) / dd, 0.0, 1.0)
    dist2 = (z - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (x - p0[2] - t * d[2]) ** 2
    rad = r0 + t * (r1 - r0)
    return sl, dist2 <= rad**2


def _ellipsoid(g: _Grid, c: np.ndarray, semi: np.ndarray, angle: float = 0.0) -> Region | None:
    """Ellipsoid centred at c (z, y, x) with semi-axes (z, y', x') rotated by ``angle`` (rad)
    about z in the axial plane."""
    r = float(np.max(semi))
    sl = g.box(c - r, c + r)
    if sl is None:
        return None
    z, y, x = g.local(sl)
    dy, dx = y - c[1], x - c[2]
    ca, sa = np.cos(angle), np.sin(angle)
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    q = ((z - c[0]) / semi[0]) ** 2 + (v / semi[1]) ** 2 + (u / semi[2]) ** 2
    return sl, q <= 1.0


def _ellipsoid_coverage(
    g: _Grid, c: np.ndarray, semi: np.ndarray, sub: int = 5
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Fraction of each voxel's volume inside the axis-aligned ellipsoid (centre c, semi-axes
    (z, y, x) mm), from ``sub``³ points per voxel; None when it touches no voxel.

    Small dense objects (plaques) are drawn with it: a voxel-centre test makes a 4 mm plaque on
    a 6 × 2.5 × 2.5 mm grid either one full voxel or nothing, and the in-plane blur then spreads
    that voxel to a quarter of its contrast. Coverage is the partial volume itself.
    """
    half = g.sp / 2
    sl = g.box(c - semi - half, c + semi + half)
    if sl is None:
        return None
    offsets = (np.arange(sub) + 0.5) / sub - 0.5  # sub-voxel sample positions, in voxels
    cover = np.zeros(tuple(s.stop - s.start for s in sl), dtype=np.float32)
    z, y, x = g.local(sl)
    for oz in offsets:
        dz = ((z + oz * g.sp[0] - c[0]) / semi[0]) ** 2
        for oy in offsets:
            dy = ((y + oy * g.sp[1] - c[1]) / semi[1]) ** 2
            for ox in offsets:
                dx = ((x + ox * g.sp[2] - c[2]) / semi[2]) ** 2
                cover += (dz + dy + dx) <= 1.0
    cover /= sub**3
    return (sl, cover) if cover.any() else None


def _full(g: _Grid, region: Region | None) -> np.ndarray:
    out = np.zeros(g.shape, dtype=bool)
    if region is not None:
        out[region[0]] |= region[1]
    return out


def _upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of a coarse grid to ``shape`` (a smooth random field)."""
    out = coarse
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0, m - 1, n)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, m - 1)
        w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
    return out


def _smooth_field(rng: np.random.Generator, g: _Grid, cell_mm: float) -> np.ndarray:
    """A smooth random field (≈ unit variance) with features of about ``cell_mm``."""
    ext = np.array(g.shape) * g.sp
    cshape = tuple(int(max(2, np.ceil(e / cell_mm) + 1)) for e in ext)
    f = _upsample(rng.standard_normal(cshape), g.shape).astype(np.float32)
    return f / max(float(f.std()), 1e-6)


def _blur_inplane(a: np.ndarray) -> np.ndarray:
    """[1, 2, 1]/4 along rows and columns (partial volume of a real reconstruction)."""
    out = a * 0.5
    out[:, 1:, :] += a[:, :-1, :] * 0.25
    out[:, :-1, :] += a[:, 1:, :] * 0.25
    out[:, 0, :] += a[:, 0, :] * 0.25
    out[:, -1, :] += a[:, -1, :] * 0.25
    res = out * 0.5
    res[:, :, 1:] += out[:, :, :-1] * 0.25
    res[:, :, :-1] += out[:, :, 1:] * 0.25
    res[:, :, 0] += out[:, :, 0] * 0.25
    res[:, :, -1] += out[:, :, -1] * 0.25
    return res


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


# ---------------------------------------------------------------------------------------------
# Finding prior
# ---------------------------------------------------------------------------------------------


def _sample_findings(rng: np.random.Generator) -> tuple[dict[str, bool], dict[str, float]]:
    """Findings from a small latent-factor prior; a fixed number of draws in a fixed order."""
    u = rng.random(32)
    age = 35 + 50 * float(u[0])
    smoker = u[1] < 0.4
    hf = u[2] < 0.15  # heart failure
    infection = u[3] < 0.15
    old = float(1 / (1 + np.exp(-(age - 62) / 6)))
    p: dict[str, float] = {}
    p["emphysema"] = 0.5 if smoker else 0.05
    p["peribronchial_thickening"] = 0.25 if smoker else 0.06
    p["pulmonary_fibrotic_sequela"] = 0.08 + 0.12 * old
    p["bronchiectasis"] = 0.06
    p["cardiomegaly"] = 0.8 if hf else 0.06
    p["interlobular_septal_thickening"] = 0.45 if hf else 0.03
    p["consolidation"] = 0.7 if infection else 0.03
    p["arterial_wall_calcification"] = 0.1 + 0.8 * old
    p["hiatal_hernia"] = 0.05 + 0.12 * old
    out: dict[str, bool] = {}
    for i, name in enumerate(p):
        out[name] = bool(u[4 + i] < p[name])
    # second wave: conditional on the first
    out["lung_nodule"] = bool(u[14] < (0.3 if smoker else 0.15) + (0.1 if out["emphysema"] else 0))
    out["lung_opacity"] = bool(u[15] < 0.08 + (0.35 if infection else 0) + (0.25 if hf else 0))
    out["pleural_effusion"] = bool(u[16] < 0.04 + (0.55 if hf else 0) + (0.2 if infection else 0))
    out["pericardial_effusion"] = bool(u[17] < (0.3 if hf else 0.03))
    out["coronary_artery_wall_calcification"] = bool(
        u[18] < (0.05 + 0.5 * old) + (0.3 if out["arterial_wall_calcification"] else 0.0)
    )
    out["atelectasis"] = bool(u[19] < 0.12 + (0.45 if out["pleural_effusion"] else 0))
    out["bronchiectasis"] = out["bronchiectasis"] or bool(
        u[20] < (0.3 if out["pulmonary_fibrotic_sequela"] else 0)
    )
    out["mosaic_attenuation_pattern"] = bool(u[21] < 0.05 + (0.2 if out["bronchiectasis"] else 0))
    findings = {name: out[name] for name in FINDINGS}
    severity = {
        name: float(0.15 + 0.85 * u[22 + i % 10]) if findings[name] else 0.0
        for i, name in enumerate(FINDINGS)
    }
    return findings, severity


# ---------------------------------------------------------------------------------------------
# The phantom
# ---------------------------------------------------------------------------------------------


class _Builder:
    def __init__(
        self,
        seed: int,
        spec: PhantomSpec,
        findings: dict[str, bool],
        severity: dict[str, float],
        streams: list[np.random.Generator],
    ) -> None:
        self.g = _Grid(spec)
        self.spec = spec
        self.f = findings
        self.sev = severity
        self.ra = streams[0]
        self.rf = {name: streams[2 + i] for i, name in enumerate(FINDINGS)}
        self.rn = streams[1]
        ext = np.array(spec.shape) * np.array(spec.spacing)
        self.s = float(min(1.0, ext[2] / 336, ext[1] / 240, ext[0] / 288))
        self.hu = np.full(spec.shape, -1000.0, dtype=np.float32)
        #: calcified plaques (box, partial-volume weight, HU), drawn after the in-plane blur
        self.plaques: list[tuple[tuple[slice, slice, slice], np.ndarray, float]] = []
        self.details: dict[str, Any] = {}

    def u(self, a: float, b: float) -> float:
        return float(self.ra.uniform(a, b)) * self.s

    # -- anatomy --------------------------------------------------------------------------

    def build(self) -> tuple[np.ndarray, np.ndarray]:
        g, s, ra = self.g, self.s, self.ra
        zlo, zhi = float(g.zc[0]), float(g.zc[-1])
        ext_z = zhi - zlo
        # body and thoracic cavity (elliptic cylinders)
        bx, by = self.u(135, 158), self.u(95, 112)
        fat = self.u(8, 24)
        cx, cy = bx - fat - self.u(13, 18), by - fat - self.u(10, 14)
        body2 = (g.x2 / bx) ** 2 + (g.y2 / by) ** 2 <= 1
        inner2 = (g.x2 / (bx - fat)) ** 2 + (g.y2 / (by - fat)) ** 2 <= 1
        cav2 = (g.x2 / cx) ** 2 + ((g.y2 - 3 * s) / cy) ** 2 <= 1
        hu = self.hu
        hu[:, body2] = -100.0 + float(ra.normal(0, 8))
        hu[:, inner2] = 45.0
        # diaphragm domes: right higher; lower toward the periphery and posteriorly
        z_dome_r = zlo + float(ra.uniform(0.16, 0.21)) * ext_z
        z_dome_l = z_dome_r - self.u(5, 20)
        side_r = g.x2 < 0
        dome_c = np.where(side_r, z_dome_r, z_dome_l)
        xc_side = np.where(side_r, -cx * 0.45, cx * 0.45)
        dome = (
            dome_c
            - 30 * s * (((g.x2 - xc_side) / (cx * 0.55)) ** 2 + (g.y2 / cy) ** 2)
            - 10 * s * np.clip(g.y2 / cy, 0, 1)
        )
        dome = np.maximum(dome, dome_c - 60 * s)
        thorax = (g.z > dome[None]) & cav2[None]
        hu[thorax] = -90.0  # mediastinal fat until organs are painted
        z_apex = min(z_dome_r + self.u(190, 225), zhi - 6 * s)
        self.details.update(z_dome_r=z_dome_r, z_apex=z_apex)

        # spine and paraspinal muscles
        r_sp = self.u(16, 20)
        y_sp = cy * float(ra.uniform(0.55, 0.68))
        spine = (g.x2**2 + (g.y2 - y_sp) ** 2) <= r_sp**2
        para = (np.abs(g.x2) < r_sp + 25 * s) & (g.y2 > y_sp - 0.4 * r_sp)
        hu[:, para & inner2] = 50.0

        # lungs: two hemithoraces tapering to the apices
        z_top_taper = z_dome_r + 0.45 * (z_apex - z_dome_r)
        tz = np.clip((g.zc - z_top_taper) / max(z_apex - z_top_taper, 1.0), 0, 1)
        scale_z = np.sqrt(np.clip(1 - tz**2, 0, 1))[:, None, None]
        mw = self.u(10, 16)
        lung = np.zeros(g.shape, dtype=bool)
        for sign in (-1.0, 1.0):
            hx = sign * cx * 0.48
            e = ((g.x - hx) / (cx * 0.54 * scale_z + 1e-6)) ** 2 + (
                (g.y - 3 * s) / (cy * (0.6 + 0.4 * scale_z) + 1e-6)
            ) ** 2 <= 1
            lung |= e & (sign * g.x > mw) & (g.z < z_apex)
        lung &= thorax & ~para[None] & ~(g.z < dome[None] + 2 * s)

        # heart
        hf = 1.0
        if self.f["cardiomegaly"]:
            hf = 1.15 + 0.2 * self.sev["cardiomegaly"]
        h_semi = np.array(
            [self.u(48, 55) * (1 + (hf - 1) * 0.5), self.u(40, 47) * hf, self.u(56, 64) * hf]
        )
        z_dome_mid = 0.5 * (z_dome_r + z_dome_l) - 8 * s
        h_c = np.array(
            [
                z_dome_mid + h_semi[0] * 0.72,
                -cy * float(ra.uniform(0.15, 0.28)),
                self.u(12, 24) + (hf - 1) * 20 * s,
            ]
        )
        angle = float(np.deg2rad(ra.uniform(25, 40)))
        self.details.update(heart_center=h_c.tolist(), heart_semi=h_semi.tolist())
        # pericardial effusion thickness (dependent: thicker posteriorly)
        t_pe = 0.0
        if self.f["pericardial_effusion"]:
            t_pe = (4 + 14 * self.sev["pericardial_effusion"]) * s
        t_fat = self.u(2.5, 5)
        fat_sh = _full(g, _ellipsoid(g, h_c, h_semi + t_pe * 1.3 + t_fat, angle))
        peri = _full(g, _ellipsoid(g, h_c, h_semi + t_pe * 1.3, angle))
        heart = _full(g, _ellipsoid(g, h_c, h_semi, angle))
        above = g.z > dome[None] - 6 * s
        fat_sh &= above & cav2[None]
        peri &= above & cav2[None]
        heart &= above & cav2[None]
        if t_pe > 0:  # dependent effusion: shift the heart anteriorly inside its sac
            heart_eff = _full(g, _ellipsoid(g, h_c - np.array([0, 0.3 * t_pe, 0]), h_semi, angle))
            heart = heart_eff & above & cav2[None]
        hu[fat_sh] = -95.0
        hu[peri & ~heart] = 12.0 if t_pe > 0 else -95.0
        myo = float(ra.uniform(38, 48))
        hu[heart] = myo
        hu[heart & _full(g, _ellipsoid(g, h_c, h_semi * 0.72, angle))] = myo - 6

        # spine geometry for the aorta and esophagus
        r_e = self.u(7, 9)
        y_e = y_sp - r_sp - r_e - 2 * s
        r_t = self.u(8, 11)
        y_t = y_e - r_e - r_t - 4 * s

        # aorta: ascending → arch → descending
        r_asc = self.u(13, 16) * (1 + 0.004 * float(ra.uniform(0, 20)))
        r_desc = self.u(10, 12.5)
        x_d = self.u(26, 32)
        y_d = y_sp - self.u(12, 18)
        while np.hypot(x_d, y_sp - y_d) < r_sp + r_desc + 5 * s:
            x_d += 1.0 * s
        z_arch = z_apex - self.u(55, 75)
        a0 = np.array([h_c[0] + h_semi[0] * 0.35, h_c[1] + self.u(8, 16), self.u(-6, 2)])
        a1 = np.array([z_arch, a0[1] + 5 * s, a0[2] - 2 * s])
        d_top = np.array([z_arch, y_d, x_d])
        h_arch = self.u(18, 28)
        bow = self.u(12, 18)  # the arch passes left of the trachea and esophagus
        pts = [a0, a1]
        for t in np.linspace(0, np.pi, 14)[1:]:
            p = a1 + (d_top - a1) * (1 - np.cos(t)) / 2
            pts.append(p + np.array([h_arch * np.sin(t), 0, bow * np.sin(t)]))
        pts.append(np.array([zlo - 10 * s, y_d + 4 * s, x_d - 4 * s]))
        radii = [r_asc, r_asc] + list(np.linspace(r_asc, r_desc, 13)) + [r_desc * 0.95]
        aorta = np.zeros(g.shape, dtype=bool)
        for i in range(len(pts) - 1):
            reg = _capsule(g, pts[i], pts[i + 1], radii[i], radii[i + 1])
            if reg is not None:
                aorta[reg[0]] |= reg[1]
        aorta &= ~heart
        hu[aorta] = float(ra.uniform(36, 46))
        self.aorta_path = (pts, radii)

        # trachea and main bronchi
        z_car = z_arch - self.u(12, 22)
        airway_wall = np.zeros(g.shape, dtype=bool)
        airway = np.zeros(g.shape, dtype=bool)
        tr = [(np.array([zhi + 10, y_t, 0.0]), np.array([z_car, y_t + 3 * s, 0.0]), r_t, r_t)]
        hila = []
        for sign in (-1.0, 1.0):
            hil = np.array(
                [z_car - self.u(18, 26), y_t + self.u(8, 14), sign * (mw + self.u(20, 28))]
            )
            hila.append(hil)
            tr.append((tr[0][1], hil, r_t * 0.75, r_t * 0.6))
        for p0, p1, r0, r1 in tr:
            for mask, extra in ((airway_wall, 2.0 * s), (airway, 0.0)):
                reg = _capsule(g, p0, p1, r0 + extra, r1 + extra)
                if reg is not None:
                    mask[reg[0]] |= reg[1]
        airway_wall &= ~aorta & ~heart
        hu[airway_wall] = 45.0
        hu[airway & ~aorta & ~heart] = -1000.0

        # esophagus: behind the trachea, to the hiatus on the left
        x_e = self.u(2, 6)
        hiatus = np.array([z_dome_l - 12 * s, y_e - 14 * s, x_e + self.u(14, 22)])
        e_pts = [
            np.array([zhi + 10, y_e, x_e]),
            np.array([z_car, y_e, x_e + 1 * s]),
            np.array([z_dome_l + 40 * s, y_e - 4 * s, x_e + 5 * s]),
            hiatus,
        ]
        eso = np.zeros(g.shape, dtype=bool)
        lumen = np.zeros(g.shape, dtype=bool)
        for i in range(3):
            reg = _capsule(g, e_pts[i], e_pts[i + 1], r_e, r_e)
            if reg is not None:
                eso[reg[0]] |= reg[1]
            if ra.random() < 0.6:
                reg = _capsule(g, e_pts[i], e_pts[i + 1], 2.2 * s, 2.2 * s)
                if reg is not None:
                    lumen[reg[0]] |= reg[1]
        if self.f["hiatal_hernia"]:
            sv = self.sev["hiatal_hernia"]
            semi = np.array([15 + 14 * sv, 13 + 10 * sv, 15 + 13 * sv]) * s
            hc = np.array([z_dome_l + semi[0] * 0.45, hiatus[1] + 8 * s, hiatus[2] + 4 * s])
            reg = _ellipsoid(g, hc, semi)
            if reg is not None:
                sac = np.zeros(g.shape, dtype=bool)
                sac[reg[0]] |= reg[1]
                sac &= ~heart & ~aorta
                eso |= sac
                hu[sac] = 28.0
                air = sac & (
                    g.y < hc[1] - semi[1] * float(self.rf["hiatal_hernia"].uniform(0.2, 0.5))
                )
                lumen |= air
                self.details["hernia_center"] = hc.tolist()
        eso &= ~aorta & ~heart & ~airway_wall
        hu[eso] = 38.0
        hu[eso & lumen] = -900.0

        # abdomen below the domes: liver (right), stomach with gas and spleen (left)
        below = (g.z <= dome[None]) & inner2[None] & ~para[None]
        liver = below & (g.x < 25 * s) & (g.z > dome[None] - 160 * s)
        hu[liver] = float(ra.uniform(52, 64))
        st = (
            _full(
                g,
                _ellipsoid(
                    g, np.array([z_dome_l - 35 * s, -10 * s, cx * 0.45]), np.array([35, 38, 42]) * s
                ),
            )
            & below
        )
        hu[st] = 25.0
        hu[st & (g.y < -25 * s)] = -950.0
        sp_ = (
            _full(
                g,
                _ellipsoid(
                    g,
                    np.array([z_dome_l - 40 * s, cy * 0.45, cx * 0.7]),
                    np.array([45, 25, 18]) * s,
                ),
            )
            & below
            & ~st
        )
        hu[sp_] = 47.0
        aorta_abd = aorta & (g.z <= dome[None])
        hu[aorta_abd] = 40.0

        # lungs, final: minus the mediastinal organs and airways
        med = fat_sh | peri | heart | aorta | eso | airway_wall
        lung &= ~med
        for reg_c in (spine,):
            lung &= ~reg_c[None]
        field = _smooth_field(ra, g, 30 * s)
        base = -865.0 + 55.0 * np.clip(g.y / cy, -1, 1) + 12.0 * field
        hu[lung] = base[lung]
        self.lung = lung
        self.heart = heart
        self.aorta = aorta
        self.eso = eso
        self.cy, self.cx = cy, cx
        self.dome = dome

        self._vessels(hila, lung)
        self._lung_findings(lung, dome, cx, cy, z_apex)

        # bones: spine, ribs, sternum (after the lungs, never inside them)
        self._bones(g, spine, y_sp, r_sp, cx, cy, bx, by, fat, dome, inner2, z_apex)

        # heart and aorta findings
        self._calcifications()

        labels = np.zeros(g.shape, dtype=np.uint8)
        labels[self.lung] = ANATOMY_LABELS["lung"]
        labels[self.eso] = ANATOMY_LABELS["esophagus"]
        labels[self.aorta] = ANATOMY_LABELS["aorta"]
        labels[self.heart] = ANATOMY_LABELS["heart"]

        img = _blur_inplane(self.hu)
        # Plaques carry their partial volume in their coverage; blurring them again would take
        # a one-voxel plaque to a quarter of its contrast, under what a scanner would show.
        for box, weight, value in self.plaques:
            view = img[box]
            view += weight * (value - view)
        sigma = float(self.rn.uniform(*self.spec.noise_hu))
        noise = self.rn.standard_normal(g.shape, dtype=np.float32)
        # in-plane correlation; [1, 2, 1]/4 twice scales the std by 0.375, undone here
        img += sigma * (_blur_inplane(noise) / 0.375)
        return img.astype(np.float32), labels

    # -- lung internals -------------------------------------------------------------------

    def _vessels(self, hila: list[np.ndarray], lung: np.ndarray) -> None:
        """A branching vessel tree per lung with companion bronchi."""
        g, s, ra = self.g, self.s, self.ra
        vessel = np.zeros(g.shape, dtype=bool)
        bwall = np.zeros(g.shape, dtype=bool)
        blumen = np.zeros(g.shape, dtype=bool)
        bx_on = self.f["bronchiectasis"]
        pb_on = self.f["peribronchial_thickening"]
        rb = self.rf["bronchiectasis"]
        bx_lower = bool(rb.random() < 0.7)
        wall_k = 1.0 + (1.2 + self.sev["peribronchial_thickening"]) if pb_on else 1.0
        dirs0 = [
            np.array([1.0, 0.1, 0.4]),
            np.array([0.1, -0.6, 0.8]),
            np.array([-0.9, 0.5, 0.5]),
            np.array([-0.5, -0.3, 0.8]),
        ]
        stack: list[tuple[np.ndarray, np.ndarray, float, float, int]] = []
        for hil in hila:
            sign = np.sign(hil[2]) or 1.0
            for d in dirs0:
                dd = _unit(d * np.array([1, 1, sign]) + ra.normal(0, 0.15, 3))
                stack.append((hil, dd, 5.5 * s, self.u(45, 60), 0))
        while stack:
            p0, d, r, length, depth = stack.pop()
            p1 = p0 + d * length
            r1 = max(r * 0.75, 1.2 * s)
            reg = _capsule(g, p0, p1, r, r1)
            if reg is not None:
                vessel[reg[0]] |= reg[1]
            lower = p0[0] < self.details["z_dome_r"] + 90 * s
            dilated = bx_on and depth >= 1 and (lower == bx_lower)
            if depth <= 1 or (dilated and depth <= 3):
                off = _unit(np.cross(d, np.array([0.0, 0.0, 1.0])) + 1e-3) * (r + 2.5 * s)
                rl = r * (1.7 + 0.6 * self.sev["bronchiectasis"]) if dilated else r * 0.55
                rl = max(rl, 1.2 * s)
                w = max(0.9 * s, 0.2 * rl) * wall_k * (1.5 if dilated else 1.0)
                for mask, extra in ((bwall, w), (blumen, 0.0)):
                    reg = _capsule(g, p0 + off, p1 + off, rl + extra, rl * 0.9 + extra)
                    if reg is not None:
                        mask[reg[0]] |= reg[1]
            if depth < 3:
                for _ in range(2):
                    nd = _unit(d + ra.normal(0, 0.45, 3))
                    stack.append((p1, nd, r1, length * float(ra.uniform(0.6, 0.8)), depth + 1))
        hu = self.hu
        hu[vessel & lung] = 42.0
        hu[bwall & lung] = 45.0 if pb_on else 40.0
        hu[blumen & lung] = -930.0
        self.vessel = vessel & lung

    def _lung_findings(
        self, lung: np.ndarray, dome: np.ndarray, cx: float, cy: float, z_apex: float
    ) -> None:
        g, s, hu, f, sev = self.g, self.s, self.hu, self.f, self.sev
        paren = lung & ~self.vessel
        zc = g.z
        height = z_apex - self.details["z_dome_r"]
        rel_z = (zc - self.details["z_dome_r"]) / max(height, 1.0)  # 0 base → 1 apex

        def inside(mask: np.ndarray, rng: np.random.Generator, where: np.ndarray) -> np.ndarray:
            idx = np.flatnonzero(mask & where)
            if idx.size == 0:
                idx = np.flatnonzero(mask)
            k = int(rng.integers(idx.size))
            zi, yi, xi = np.unravel_index(idx[k], g.shape)
            return np.array([g.zc[zi], g.yc[yi], g.xc[xi]])

        if f["mosaic_attenuation_pattern"]:
            r = self.rf["mosaic_attenuation_pattern"]
            fld = _smooth_field(r, g, 22 * s)
            low = paren & (fld > 0.2)
            d = 50 + 40 * sev["mosaic_attenuation_pattern"]
            hu[low] -= d
            hu[paren & (fld < -0.4)] += d * 0.6
        if f["emphysema"]:
            r = self.rf["emphysema"]
            n = int(30 + 120 * sev["emphysema"] * self.s**2)
            upper = rel_z > 0.45
            for _ in range(n):
                c = inside(paren, r, np.broadcast_to(upper, g.shape))
                rad = float(r.uniform(3, 8 + 6 * sev["emphysema"])) * s
                reg = _ellipsoid(g, c, np.array([rad * 1.2, rad, rad]))
                if reg is not None:
                    m = reg[1] & paren[reg[0]]
                    hu[reg[0]][m] = -965.0 + float(r.normal(0, 8))
        if f["interlobular_septal_thickening"]:
            r = self.rf["interlobular_septal_thickening"]
            lam = float(r.uniform(10, 16)) * s
            a = float(r.uniform(0, np.pi))
            warp = _smooth_field(r, g, 25 * s) * 3 * s
            u1 = (np.cos(a) * g.x + np.sin(a) * g.y + warp) / lam
            u2 = (-np.sin(a) * g.x + np.cos(a) * g.y - warp) / lam
            w = 0.12
            lines = (np.abs(u1 - np.round(u1)) < w) | (np.abs(u2 - np.round(u2)) < w)
            ell = (g.x / cx) ** 2 + ((g.y - 3 * s) / cy) ** 2
            periph = ell > (0.55 - 0.2 * sev["interlobular_septal_thickening"])
            lower = rel_z < 0.4 + 0.4 * sev["interlobular_septal_thickening"]
            m = paren & lines & periph & lower
            hu[m] = -350.0 + float(r.normal(0, 30))
        if f["lung_opacity"]:
            r = self.rf["lung_opacity"]
            n = int(r.integers(1, 4 + int(4 * sev["lung_opacity"])))
            for _ in range(n):
                c = inside(paren, r, paren)
                semi = np.array([r.uniform(12, 30), r.uniform(12, 30), r.uniform(12, 30)]) * s
                semi *= 0.7 + 0.6 * sev["lung_opacity"]
                reg = _ellipsoid(g, c, semi, float(r.uniform(0, np.pi)))
                if reg is not None:
                    m = reg[1] & paren[reg[0]]
                    sub = hu[reg[0]]
                    sub[m] = np.maximum(sub[m] + float(r.uniform(260, 360)), -600.0)
                    hu[reg[0]] = sub
        if f["pulmonary_fibrotic_sequela"]:
            r = self.rf["pulmonary_fibrotic_sequela"]
            for _ in range(int(r.integers(2, 5 + int(4 * sev["pulmonary_fibrotic_sequela"])))):
                c0 = inside(paren, r, np.broadcast_to(rel_z > 0.5, g.shape))
                dv = _unit(r.normal(0, 1, 3) * np.array([0.4, 1, 1]))
                c1 = c0 + dv * float(r.uniform(18, 40)) * s
                reg = _capsule(g, c0, c1, 3.2 * s, 2.2 * s)
                if reg is not None:
                    m = reg[1] & lung[reg[0]]
                    hu[reg[0]][m] = -30.0 + float(r.normal(0, 20))
        if f["consolidation"]:
            r = self.rf["consolidation"]
            c = inside(paren, r, np.broadcast_to(rel_z < 0.45, g.shape) & (g.y > 0))
            semi = np.array([r.uniform(20, 35), r.uniform(18, 30), r.uniform(18, 30)]) * s
            semi *= 0.8 + 0.6 * sev["consolidation"]
            reg = _ellipsoid(g, c, semi, float(r.uniform(0, np.pi)))
            if reg is not None:
                m = reg[1] & lung[reg[0]]
                hu[reg[0]][m] = 32.0
                # air bronchograms
                for _ in range(3):
                    dv = _unit(r.normal(0, 1, 3))
                    br = _capsule(
                        g, c - dv * semi[1] * 0.6, c + dv * semi[1] * 0.6, 1.6 * s, 1.2 * s
                    )
                    if br is not None:
                        mm = br[1] & lung[br[0]] & _full(g, reg)[br[0]]
                        hu[br[0]][mm] = -850.0
                self.details["consolidation_center"] = c.tolist()
        if f["lung_nodule"]:
            r = self.rf["lung_nodule"]
            nods = []
            for _ in range(int(r.integers(1, 2 + int(2.5 * sev["lung_nodule"])))):
                diam = float(r.uniform(5, 8 + 12 * sev["lung_nodule"])) * max(s, 0.5)
                for _try in range(20):
                    c = g.snap(inside(paren, r, paren))
                    reg = _ellipsoid(g, c, np.array([diam / 2] * 3))
                    if reg is not None and bool(lung[reg[0]][reg[1]].all()):
                        break
                if reg is None:
                    continue
                solid = r.random() < 0.8
                hu[reg[0]][reg[1]] = (15.0 if solid else -520.0) + float(r.normal(0, 10))
                nods.append(
                    {"center_mm": c.tolist(), "diameter_mm": round(diam, 1), "solid": bool(solid)}
                )
            self.details["nodules"] = nods
        if f["atelectasis"]:
            r = self.rf["atelectasis"]
            for _ in range(int(r.integers(1, 3))):
                c = inside(paren, r, np.broadcast_to(rel_z < 0.35, g.shape) & (g.y > -10 * s))
                semi = np.array([3.5, 30, 25]) * s * (0.8 + 0.6 * sev["atelectasis"])
                semi[0] = max(semi[0], 4.0 * s)
                reg = _ellipsoid(g, c, semi, float(r.uniform(0, np.pi)))
                if reg is not None:
                    m = reg[1] & lung[reg[0]]
                    hu[reg[0]][m] = -80.0 + float(r.normal(0, 20))
        if f["pleural_effusion"]:
            r = self.rf["pleural_effusion"]
            sides = [(-1.0,), (1.0,), (-1.0, 1.0)][int(r.choice(3, p=[0.25, 0.2, 0.55]))]
            eff = np.zeros(g.shape, dtype=bool)
            d0 = (14 + 36 * sev["pleural_effusion"]) * s
            z0 = self.details["z_dome_r"]
            for sign in sides:
                hx = sign * cx * 0.48
                dz = np.clip(1 - (zc - z0) / (0.55 * height), 0, 1)
                shift = d0 * dz
                e_out = ((g.x - hx) / (cx * 0.56)) ** 2 + ((g.y - 3 * s) / cy) ** 2 <= 1
                e_in = ((g.x - hx) / (cx * 0.56)) ** 2 + ((g.y - 3 * s + shift) / cy) ** 2 <= 1
                eff |= (
                    (sign * g.x > 0)
                    & e_out
                    & ~e_in
                    & (self.lung | (hu < -500))
                    & (dz > 0)
                    & (g.z > dome[None] - 20 * s)
                )
            eff &= ~self.heart & ~self.aorta & ~self.eso
            eff &= self.lung
            hu[eff] = float(r.uniform(5, 18))
            self.lung &= ~eff
            self.details["pleural_effusion_sides"] = [("right" if x < 0 else "left") for x in sides]
            self.effusion = eff

    # -- bones ------------------------------------------------------------------------------

    def _bones(
        self,
        g: _Grid,
        spine: np.ndarray,
        y_sp: float,
        r_sp: float,
        cx: float,
        cy: float,
        bx: float,
        by: float,
        fat: float,
        dome: np.ndarray,
        inner2: np.ndarray,
        z_apex: float,
    ) -> None:
        s, ra, hu = self.s, self.ra, self.hu
        pitch = self.u(24, 28)
        phase = float(ra.uniform(0, pitch))
        disc = (np.mod(g.zc + phase, pitch) < 5 * s)[:, None, None]
        cortex = (g.x2**2 + (g.y2 - y_sp) ** 2) >= (r_sp - 2 * s) ** 2
        vb = np.where(disc, 85.0, np.where(cortex[None], 650.0, 230.0))
        sp3 = (
            np.broadcast_to(spine[None], g.shape)
            & ~self.lung
            & ~self.aorta
            & ~self.eso
            & ~self.heart
        )
        hu[sp3] = np.broadcast_to(vb, g.shape)[sp3]
        y_can = y_sp + r_sp + 8 * s
        rc = np.hypot(g.x2, g.y2 - y_can)
        ring = (rc < 13 * s) & (rc >= 7.5 * s)
        spinous = (np.abs(g.x2) < 4 * s) & (g.y2 > y_can) & (g.y2 < by - fat - 8 * s)
        post = ring | spinous
        hu[:, post & ~spine] = 600.0
        hu[:, rc < 7.5 * s] = 30.0
        # ribs: oblique bands in the chest wall, posterior ends higher than anterior ones
        ell_c = np.sqrt((g.x2 / cx) ** 2 + ((g.y2 - 3 * s) / cy) ** 2)
        wall = (ell_c > 1.02) & (ell_c < 1.02 + 9 * s / cy)
        theta = np.arctan2(g.y2, np.abs(g.x2))  # +π/2 posterior, −π/2 anterior
        drop = (1 - np.sin(theta)) * 0.5 * 45 * s  # anterior ends up to 45 mm lower
        rib_pitch = self.u(24, 30)
        rib_phase = float(ra.uniform(0, rib_pitch))
        ph = np.mod(g.z + drop[None] + rib_phase, rib_pitch)
        rib = (ph < 9 * s) & wall[None] & (np.abs(g.x2) > 14 * s)[None] & (g.z < z_apex - 5 * s)
        rib &= g.z > dome[None] - 60 * s
        cart = (theta < -0.9)[None]
        hu[rib & ~cart] = 520.0
        hu[rib & cart] = 140.0
        sternum = (np.abs(g.x2) < 14 * s) & (g.y2 < -cy * 0.9) & (g.y2 > -(by - fat)) & inner2
        zs = (g.z > dome[None] + 10 * s) & (g.z < z_apex - 20 * s)
        hu[sternum[None] & zs & ~self.heart] = 400.0

    # -- calcifications -----------------------------------------------------------------------

    def _calcifications(self) -> None:
        """Collect the plaques (:attr:`plaques`); :meth:`build` draws them after the blur."""
        g, s = self.g, self.s
        if self.f["arterial_wall_calcification"]:
            r = self.rf["arterial_wall_calcification"]
            pts, radii = self.aorta_path
            n = int(3 + 14 * self.sev["arterial_wall_calcification"])
            placed = 0
            for _ in range(n * 4):
                if placed >= n:
                    break
                i = int(r.integers(1, len(pts) - 1))
                t = float(r.random())
                c = pts[i] + (pts[i + 1] - pts[i]) * t
                rad = radii[i] + (radii[i + 1] - radii[i]) * t
                d = _unit(np.cross(pts[i + 1] - pts[i], r.normal(0, 1, 3)))
                p = c + d * (rad - 1.5 * s)
                cover = _ellipsoid_coverage(g, p, np.array([2.5, 2.2, 2.2]) * max(s, 0.7))
                if cover is None:
                    continue
                weight = cover[1] * self.aorta[cover[0]]
                if not weight.any():
                    continue
                self.plaques.append((cover[0], weight, float(r.uniform(450, 1000))))
                placed += 1
        if self.f["coronary_artery_wall_calcification"]:
            r = self.rf["coronary_artery_wall_calcification"]
            c = np.array(self.details["heart_center"])
            semi = np.array(self.details["heart_semi"])
            n = int(2 + 10 * self.sev["coronary_artery_wall_calcification"])
            idx = np.flatnonzero(self.heart)
            zi, yi, xi = np.unravel_index(idx, g.shape)
            pos = np.stack([g.zc[zi], g.yc[yi], g.xc[xi]], axis=1)
            # candidate surface voxels: outer shell of the heart, anterior-superior half (AV groove)
            q = np.sqrt((((pos - c) / semi) ** 2).sum(axis=1))
            cand = np.flatnonzero((q > 0.85) & (pos[:, 1] < c[1] + semi[1] * 0.3))
            for k in r.choice(cand, size=min(n, cand.size), replace=False):
                centre = pos[k] + r.uniform(-0.5, 0.5, 3) * g.sp  # anywhere in that voxel
                cover = _ellipsoid_coverage(g, centre, np.array([2.5, 2.0, 2.0]) * max(s, 0.7))
                if cover is None:
                    continue
                weight = cover[1] * self.heart[cover[0]]
                if not weight.any():
                    continue
                self.plaques.append((cover[0], weight, float(r.uniform(350, 900))))


def make_case(
    seed: int,
    spec: PhantomSpec | None = None,
    *,
    force: Mapping[str, bool] | None = None,
) -> Case:
    """One phantom, fully determined by ``seed`` (and ``spec``, ``force``).

    ``force`` sets findings on or off regardless of the prior (names of :data:`FINDINGS`); a
    forced-on finding without a drawn severity gets a moderate one. Everything else of the seed
    (anatomy, noise, other findings) stays the same.
    """
    spec = spec or PhantomSpec()
    streams = [np.random.default_rng(c) for c in np.random.SeedSequence(seed).spawn(2 + 16 + 2)]
    findings, severity = _sample_findings(streams[-2])
    sev_if_forced = streams[-1].uniform(0.3, 0.9, len(FINDINGS))
    for name, on in (force or {}).items():
        if name not in findings:
            raise ValueError(f"force: unknown finding {name!r} (known: {', '.join(FINDINGS)})")
        findings[name] = bool(on)
        if on and severity[name] == 0.0:
            severity[name] = float(sev_if_forced[FINDINGS.index(name)])
        if not on:
            severity[name] = 0.0
    b = _Builder(seed, spec, findings, severity, streams)
    hu, labels = b.build()
    text_rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    rep_f, rep_i = _report(findings, severity, b.details, text_rng)
    return Case(
        seed=seed,
        hu=hu,
        labels=labels,
        affine=spec.affine,
        spacing=spec.spacing,
        findings=findings,
        severity=severity,
        report_findings=rep_f,
        report_impression=rep_i,
        details=b.details,
    )


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

_NORMAL = {
    "airways": [
        "Trachea and both main bronchi are patent.",
        "The trachea and main bronchi are open and of normal calibre.",
        "Central airways are patent.",
    ],
    "heart": [
        "Heart size is normal.",
        "The heart is of normal size.",
        "Cardiac dimensions are within normal limits.",
        "Heart contour and size are unremarkable.",
    ],
    "pericardium": ["No pericardial effusion.", "No pericardial thickening or effusion is seen."],
    "aorta": [
        "The thoracic aorta is of normal calibre.",
        "Thoracic aortic diameter is within normal limits.",
        "Main mediastinal vascular structures have a normal course and width.",
    ],
    "esophagus": [
        "The esophagus is unremarkable.",
        "Esophageal course and wall thickness are normal.",
        "No esophageal wall thickening is seen.",
    ],
    "lung": [
        "Both lungs are clear.",
        "Lung parenchyma is normally aerated.",
        "No focal lesion is seen in the lung parenchyma.",
        "The lung fields are unremarkable bilaterally.",
    ],
    "lung_neg": [
        "No pleural effusion.",
        "No pulmonary nodule or mass is detected.",
        "No consolidation is seen.",
        "No pleural effusion or pneumothorax.",
    ],
    "other": [
        "No pathologically enlarged mediastinal or hilar lymph nodes.",
        "Mediastinal lymph nodes are not enlarged.",
        "Bones included in the field of view show degenerative changes only.",
        "No lytic or sclerotic bone lesion is seen.",
        "Upper abdominal organs included in the study are unremarkable.",
        "Thyroid gland is unremarkable where included.",
    ],
}

_NONE_IMPRESSION = [
    "No acute abnormality.",
    "No significant abnormality in the chest.",
    "Unremarkable study.",
    "No acute findings.",
]


def _sev_word(v: float, rng: np.random.Generator) -> str:
    words = (
        ["mild", "minimal"]
        if v < 0.4
        else (["moderate"] if v < 0.75 else ["marked", "severe", "large"])
    )
    return str(rng.choice(words))


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _phrases(name: str, v: float, det: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression phrase) for a present finding."""
    sw = _sev_word(v, rng)
    side = _pick(rng, ["both lungs", "the right lung", "the left lung"])
    if name == "emphysema":
        return (
            _pick(
                rng,
                [
                    f"{sw.capitalize()} centrilobular emphysema in both upper lobes.",
                    f"Emphysematous changes are seen predominantly in the upper lobes ({sw}).",
                    f"Areas of low attenuation consistent with {sw} emphysema.",
                ],
            ),
            _pick(
                rng,
                [
                    "Emphysema.",
                    f"{sw.capitalize()} emphysematous changes.",
                    "Centrilobular emphysema.",
                ],
            ),
        )
    if name == "atelectasis":
        return (
            _pick(
                rng,
                [
                    f"Subsegmental atelectasis in the lower lobe of {side}.",
                    "Linear atelectasis at the lung bases.",
                    "Plate-like atelectatic bands in the lower lobes.",
                ],
            ),
            _pick(
                rng,
                ["Atelectasis.", "Basal subsegmental atelectasis.", "Linear atelectatic changes."],
            ),
        )
    if name == "lung_nodule":
        nods = det.get("nodules") or [{"diameter_mm": 6.0, "solid": True}]
        big = max(n["diameter_mm"] for n in nods)
        kind = "solid" if nods[0]["solid"] else "ground-glass"
        many = len(nods) > 1
        return (
            _pick(
                rng,
                [
                    f"{'Nodules are' if many else 'A nodule is'} seen in {side}, the "
                    f"largest {kind} and {big:.0f} mm in diameter.",
                    f"{kind.capitalize()} pulmonary nodule{'s' if many else ''} up to "
                    f"{big:.0f} mm.",
                    f"There {'are' if many else 'is a'} nodular lesion{'s' if many else ''}"
                    f" in {side} measuring up to {big:.0f} mm.",
                ],
            ),
            _pick(
                rng,
                [
                    f"Pulmonary nodule{'s' if many else ''} (up to {big:.0f} mm); "
                    "follow-up recommended.",
                    f"Lung nodule{'s' if many else ''}.",
                    f"{big:.0f} mm nodule in the lung.",
                ],
            ),
        )
    if name == "lung_opacity":
        return (
            _pick(
                rng,
                [
                    f"Patchy ground-glass opacities in {side}.",
                    f"Areas of ground glass density are seen in {side}.",
                    f"Focal opacities with ground-glass attenuation in {side}.",
                ],
            ),
            _pick(
                rng,
                [
                    "Ground-glass opacities in the lungs.",
                    "Pulmonary opacities.",
                    "Patchy ground glass opacity.",
                ],
            ),
        )
    if name == "pulmonary_fibrotic_sequela":
        return (
            _pick(
                rng,
                [
                    "Fibrotic bands and parenchymal strands in the upper lobes.",
                    "Linear fibrotic sequelae are noted in both lungs.",
                    "Sequelae of fibrosis with parenchymal bands in the upper zones.",
                ],
            ),
            _pick(
                rng,
                [
                    "Fibrotic sequelae in the lungs.",
                    "Pulmonary fibrotic changes.",
                    "Sequelae of pulmonary fibrosis.",
                ],
            ),
        )
    if name == "pleural_effusion":
        sides = det.get("pleural_effusion_sides", ["right", "left"])
        where = "bilateral" if len(sides) == 2 else sides[0]
        return (
            _pick(
                rng,
                [
                    f"{sw.capitalize()} {where} pleural effusion.",
                    f"Pleural fluid is present on the {where} side{'s' if len(sides) == 2 else ''}"
                    f" ({sw}).",
                    f"A {sw} {where} pleural effusion with dependent distribution.",
                ],
            ),
            _pick(
                rng,
                [
                    f"{where.capitalize()} pleural effusion.",
                    f"{sw.capitalize()} {where} pleural effusion.",
                    f"Pleural fluid ({where}).",
                ],
            ),
        )
    if name == "mosaic_attenuation_pattern":
        return (
            _pick(
                rng,
                [
                    "Mosaic attenuation pattern in both lungs.",
                    "Geographic areas of differing attenuation (mosaic pattern).",
                    "Heterogeneous lung attenuation with a mosaic appearance.",
                ],
            ),
            _pick(
                rng,
                [
                    "Mosaic attenuation pattern.",
                    "Mosaic attenuation of the lungs.",
                    "Mosaic pattern, air trapping should be considered.",
                ],
            ),
        )
    if name == "peribronchial_thickening":
        return (
            _pick(
                rng,
                [
                    "Peribronchial thickening is present.",
                    "Bronchial wall thickening is seen in both lungs.",
                    "Diffuse bronchial wall thickening.",
                ],
            ),
            _pick(
                rng,
                [
                    "Peribronchial thickening.",
                    "Bronchial wall thickening.",
                    "Peribronchial thickening, consistent with airway disease.",
                ],
            ),
        )
    if name == "consolidation":
        lobe = "lower lobe"
        return (
            _pick(
                rng,
                [
                    f"Consolidation with air bronchograms in the {lobe} of {side}.",
                    f"Dense consolidative area in the posterior {lobe}.",
                    f"Airspace consolidation in the {lobe} of {side}.",
                ],
            ),
            _pick(
                rng,
                [
                    "Consolidation, likely pneumonia.",
                    "Pulmonary consolidation.",
                    f"Consolidation in the {lobe}.",
                ],
            ),
        )
    if name == "bronchiectasis":
        return (
            _pick(
                rng,
                [
                    "Cylindrical bronchiectasis is seen.",
                    "Dilated bronchi larger than the adjacent arteries (bronchiectasis).",
                    "Bronchiectatic changes in the lower lobes.",
                ],
            ),
            _pick(
                rng, ["Bronchiectasis.", "Bronchiectatic changes.", "Cylindrical bronchiectasis."]
            ),
        )
    if name == "interlobular_septal_thickening":
        return (
            _pick(
                rng,
                [
                    "Interlobular septal thickening at the lung bases.",
                    "Thickened interlobular septa in the peripheral lung.",
                    "Smooth septal thickening in both lower zones.",
                ],
            ),
            _pick(
                rng,
                [
                    "Interlobular septal thickening.",
                    "Septal thickening.",
                    "Thickened interlobular septa, consider interstitial edema.",
                ],
            ),
        )
    if name == "cardiomegaly":
        return (
            _pick(
                rng,
                [
                    "The heart is enlarged (cardiomegaly).",
                    "Cardiomegaly is present.",
                    "Cardiac enlargement is noted.",
                ],
            ),
            _pick(rng, ["Cardiomegaly.", "Cardiac enlargement.", "Enlarged heart."]),
        )
    if name == "pericardial_effusion":
        return (
            _pick(
                rng,
                [
                    f"{sw.capitalize()} pericardial effusion.",
                    f"Pericardial fluid up to {5 + 13 * v:.0f} mm in thickness.",
                    f"A {sw} pericardial effusion surrounds the heart.",
                ],
            ),
            _pick(
                rng,
                [
                    "Pericardial effusion.",
                    f"{sw.capitalize()} pericardial effusion.",
                    "Pericardial fluid.",
                ],
            ),
        )
    if name == "coronary_artery_wall_calcification":
        return (
            _pick(
                rng,
                [
                    "Calcified plaques in the coronary arteries.",
                    "Coronary artery calcifications are noted.",
                    "Atherosclerotic calcification along the coronary arteries.",
                ],
            ),
            _pick(
                rng,
                [
                    "Coronary artery calcification.",
                    "Coronary atherosclerosis.",
                    "Calcified coronary plaques.",
                ],
            ),
        )
    if name == "hiatal_hernia":
        return (
            _pick(
                rng,
                [
                    "A sliding hiatal hernia is present.",
                    "Hiatal hernia is seen.",
                    "Part of the stomach lies above the diaphragm (hiatus hernia).",
                ],
            ),
            _pick(rng, ["Hiatal hernia.", "Sliding hiatus hernia.", "Small hiatal hernia."]),
        )
    if name == "arterial_wall_calcification":
        return (
            _pick(
                rng,
                [
                    "Aortic wall calcification is present.",
                    "Calcified aortic plaques along the arch and descending aorta.",
                    "Atherosclerotic calcification of the aortic wall.",
                ],
            ),
            _pick(
                rng,
                [
                    "Aortic atherosclerosis.",
                    "Aortic wall calcification.",
                    "Atherosclerotic calcification of the aorta.",
                ],
            ),
        )
    raise ValueError(f"unknown finding {name!r}")


def _report(
    findings: dict[str, bool],
    severity: dict[str, float],
    det: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[str, str]:
    """CT-RATE style findings text and impression; the impression lists abnormal findings only."""
    phr = {n: _phrases(n, severity[n], det, rng) for n in FINDINGS if findings[n]}
    abnormal = {a: [n for n in phr if FINDING_ANATOMY[n] == a] for a in ANATOMY_LABELS}

    def normal(key: str, p_mention: float) -> list[str]:
        return [_pick(rng, _NORMAL[key])] if rng.random() < p_mention else []

    out: list[str] = []
    airway_f = [phr[n][0] for n in ("bronchiectasis", "peribronchial_thickening") if n in phr]
    out += normal("airways", 0.7) if not airway_f else []
    # mediastinum: heart, pericardium, aorta, esophagus
    heart = [phr[n][0] for n in abnormal["heart"]]
    if not heart:
        out += normal("heart", 0.75)
    else:
        out += heart
    if "pericardial_effusion" not in phr and rng.random() < 0.4:
        out += normal("pericardium", 1.0)
    out += [phr[n][0] for n in abnormal["aorta"]] or normal("aorta", 0.7)
    out += [phr[n][0] for n in abnormal["esophagus"]] or normal("esophagus", 0.5)
    out += normal("other", 0.6)
    out += airway_f
    lung = [
        phr[n][0]
        for n in abnormal["lung"]
        if n not in ("bronchiectasis", "peribronchial_thickening")
    ]
    if not abnormal["lung"]:
        out += normal("lung", 0.85)
    out += lung
    negs = [
        t
        for t in _NORMAL["lung_neg"]
        if not any(term in t.lower() for n in phr for term in SYNONYMS[n])
        and not ("consolidation" in t.lower() and "consolidation" in phr)
    ]
    if negs and rng.random() < 0.6:
        out.append(_pick(rng, negs))
    out += normal("other", 0.5)
    text = " ".join(dict.fromkeys(out))  # each sentence once, in order
    order = [n for a in ("lung", "heart", "aorta", "esophagus") for n in abnormal[a]]
    if len(order) > 1:
        order = [order[i] for i in rng.permutation(len(order))] if rng.random() < 0.3 else order
    impression = " ".join(phr[n][1] for n in order) if order else _pick(rng, _NONE_IMPRESSION)
    return text, impression


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_case(
    case: Case, out_dir: Path, *, dicom: bool = False, seg: bool = False
) -> dict[str, str]:
    """Write one case into ``out_dir``; returns the written paths by kind.

    ``case.npz`` holds ``hu`` (int16, rounded HU), ``labels`` (uint8) and ``affine``;
    ``report.txt`` the report; ``labels.json`` the finding labels, severities and details. With
    ``dicom`` a CT series goes to ``dicom/ct/`` and with ``seg`` (implies ``dicom``) a DICOM SEG of
    the anatomies to ``dicom/seg.dcm``, in the same study and frame of reference.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    np.savez_compressed(
        out_dir / "case.npz",
        hu=np.clip(np.round(case.hu), -32768, 32767).astype(np.int16),
        labels=case.labels,
        affine=case.affine,
    )
    paths["npz"] = str(out_dir / "case.npz")
    (out_dir / "report.txt").write_text(case.report, encoding="utf-8")
    paths["report"] = str(out_dir / "report.txt")
    meta = {
        "seed": case.seed,
        "findings": {k: int(v) for k, v in case.findings.items()},
        "severity": {k: round(v, 4) for k, v in case.severity.items()},
        "simulated": list(SIMULATED),
        "anatomy_labels": ANATOMY_LABELS,
        "spacing_mm": list(case.spacing),
        "details": case.details,
    }
    (out_dir / "labels.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    paths["labels"] = str(out_dir / "labels.json")
    if dicom or seg:
        paths.update(_write_dicom(case, out_dir / "dicom", seg))
    return paths


def _write_dicom(case: Case, folder: Path, with_seg: bool) -> dict[str, str]:
    from pydicom.uid import generate_uid

    from fvlm_pacs.synthetic import SeriesSpec, ct_series, write_series

    d, h, w = case.hu.shape
    sz, sy, sx = case.spacing
    origin = case.affine[:3, 3]
    spec = SeriesSpec(
        n_slices=d,
        rows=h,
        columns=w,
        pixel_spacing=(sy, sx),
        slice_thickness=sz,
        slice_spacing=sz,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        series_description=f"Chest {sz:g} mm phantom",
    )
    hu = case.hu

    def slice_k(k: int, rows: int, cols: int) -> np.ndarray:
        return np.asarray(hu[k], dtype=np.float64)

    study_uid = generate_uid()
    for_uid = generate_uid()
    patient = f"PHANTOM{case.seed:08d}"
    datasets = ct_series(
        spec,
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
        patient_id=patient,
        hu=slice_k,
    )
    write_series(datasets, folder / "ct")
    out = {"dicom": str(folder / "ct")}
    if with_seg:
        out["seg"] = str(_write_seg(case, datasets, folder / "seg.dcm"))
    return out


def _write_seg(case: Case, datasets: list[Any], path: Path) -> Path:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from fvlm_pacs import __version__
    from fvlm_pacs.codes import load_anatomies

    table = load_anatomies("ct-rate")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fvlm_pacs chest phantom (labels exact by construction)",
        version=__version__,
        family=codes.cid7162.MorphologicalOperations,
    )
    descriptions = []
    planes = []
    for i, a in enumerate(table.anatomies):
        cat = a.segmentation_category
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i + 1,
                segment_label=a.name,
                segmented_property_category=hd.sr.CodedConcept(cat.value, cat.scheme, cat.meaning),
                segmented_property_type=hd.sr.CodedConcept(
                    a.code.value, a.code.scheme, a.code.meaning
                ),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
        planes.append(case.labels == a.label)
    pixel = np.stack(planes, axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=300,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="fvlm_pacs synthetic",
        manufacturer_model_name="chest phantom",
        software_versions=__version__,
        device_serial_number="0",
        series_description="Phantom anatomy labels",
    )
    seg.save_as(path)
    return path


def write_dataset(
    n: int,
    seed: int,
    out_dir: Path,
    *,
    dicom: bool = False,
    seg: bool = False,
    spec: PhantomSpec | None = None,
) -> Path:
    """Write ``n`` cases (``case_00000`` …; case i uses seed ``seed + i``) and ``manifest.csv``
    (case id, seed, one 0/1 column per finding, paths). Returns the manifest path."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        case = make_case(seed + i, spec)
        cid = f"case_{i:05d}"
        paths = write_case(case, out_dir / cid, dicom=dicom, seg=seg)
        row: dict[str, Any] = {"case_id": cid, "seed": seed + i}
        row.update({name: int(case.findings[name]) for name in FINDINGS})
        for kind in ("npz", "report", "labels", "dicom", "seg"):
            p = paths.get(kind)
            row[kind] = str(Path(p).relative_to(out_dir)) if p else ""
        rows.append(row)
    manifest = out_dir / "manifest.csv"
    fields = ["case_id", "seed", *FINDINGS, "npz", "report", "labels", "dicom", "seg"]
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return manifest
