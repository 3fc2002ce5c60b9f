"""The privacy-fidelity curve the report draws each run on: measured, not modelled.

Figures printed by `benchmarks/bench_fidelity.py --photos-dir PHOTOS --reference 3 --weights-dir DIR
--iterations 4 --pgd-steps 8 --ft-steps 8` (public photos of one person: the obama*.jpg test photos
in the sdist of face_recognition 1.3.0; tiny model, 256 px, dlib_resnet attacked, MobileFaceNet held
out). eta is in the [-1,1] pixel scale. Re-measure and paste here when the engine's defaults change.
"""
from __future__ import annotations

from typing import NamedTuple


class CurvePoint(NamedTuple):
    eta: float
    psnr: float
    held_out_drop: float  # 1 - cosine after / cosine before, of the held-out recognizer


HELD_OUT = "MobileFaceNet"
SETTINGS = "tiny model, 256 px, K=4, T=8"
CURVES: dict[str, tuple[CurvePoint, ...]] = {
    "face_mask (default)": (
        CurvePoint(0.03, 43.3, 0.128),
        CurvePoint(0.05, 39.3, 0.218),
        CurvePoint(0.08, 36.3, 0.276),
        CurvePoint(0.10, 35.4, 0.331),
        CurvePoint(0.15, 34.5, 0.394),
    ),
    "paper: whole frame": (
        CurvePoint(0.03, 38.7, 0.139),
        CurvePoint(0.05, 34.9, 0.203),
        CurvePoint(0.08, 32.3, 0.264),
        CurvePoint(0.10, 31.5, 0.315),
        CurvePoint(0.15, 30.9, 0.362),
    ),
}
