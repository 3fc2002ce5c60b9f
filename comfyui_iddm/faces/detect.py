"""Face detection with 5 landmarks, behind a small port.

Backends: MTCNN (facenet-pytorch; its weights ship inside the wheel, so it works offline) and
SCRFD (det_10g.onnx from a user's InsightFace pack, run with onnxruntime). Detection runs only on
clean photos to find landmarks; it never needs gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from .registry import insightface_pack_dirs
from .weights import find_weight

SCRFD_FILES = ("det_10g.onnx",)


@dataclass
class FaceDetection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left mouth, right mouth (image left)
    score: float

    @property
    def size(self) -> float:
        """Side of the face box (the smaller of width and height), in pixels."""
        x1, y1, x2, y2 = self.box
        return float(min(x2 - x1, y2 - y1))


class FaceDetector(Protocol):
    name: str

    def detect(self, images: Tensor) -> list[list[FaceDetection]]:
        """images [B,3,H,W] in [0,1] -> per image, the faces found, best score first."""


def _to_uint8_hwc(images: Tensor) -> np.ndarray:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"face detection needs images [B,3,H,W] in [0,1]; got {tuple(images.shape)}.")
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class MTCNNDetector:
    name = "mtcnn"

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 min_score: float = 0.9) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as err:
            raise ImportError("the MTCNN face detector needs facenet-pytorch (and torchvision matching "
                              "your torch): pip install --no-deps facenet-pytorch  (always --no-deps: "
                              f"its declared requirements would replace your torch). Detail: {err}") from None
        self._mtcnn = MTCNN(keep_all=True, select_largest=False, min_face_size=min_face_size,
                            device=torch.device(device))
        self.min_score = min_score

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[list[FaceDetection]]:
        batch = torch.from_numpy(_to_uint8_hwc(images)).float()
        boxes, probs, points = self._mtcnn.detect(batch, landmarks=True)
        return [[f for f in _detections(b, p, pts) if f.score >= self.min_score]
                for b, p, pts in zip(boxes, probs, points)]


def _detections(boxes, scores, points) -> list[FaceDetection]:
    if boxes is None:
        return []
    faces = [FaceDetection(tuple(float(v) for v in box[:4]), np.asarray(lm, np.float32).reshape(5, 2),
                           float(score)) for box, score, lm in zip(boxes, scores, points)]
    return sorted(faces, key=lambda f: -f.score)


class SCRFDDetector:
    """InsightFace's SCRFD (det_10g.onnx): anchor-free boxes and 5 keypoints at strides 8/16/32."""

    name = "scrfd"

    def __init__(self, model_path: Path, input_size: int = 640, score_threshold: float = 0.5,
                 nms_threshold: float = 0.4) -> None:
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError("the SCRFD face detector needs onnxruntime: pip install onnxruntime. "
                              f"Detail: {err}") from None
        self._session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self._input_name = self._session.get_inputs()[0].name
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    @torch.no_grad()
    def detect(self, images: Tensor) -> list[list[FaceDetection]]:
        return [self._detect_one(img) for img in images]

    def _detect_one(self, image: Tensor) -> list[FaceDetection]:
        # Letterbox: scale the longer side to input_size, pad right/bottom (as SCRFD was trained).
        _, height, width = image.shape
        scale = self.input_size / max(height, width)
        new_h, new_w = round(height * scale), round(width * scale)
        resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w),
                                                  mode="bilinear", align_corners=False, antialias=True)
        canvas = torch.zeros(1, 3, self.input_size, self.input_size)
        canvas[:, :, :new_h, :new_w] = resized.clamp(0, 1)
        blob = ((canvas * 255 - 127.5) / 128.0).numpy().astype(np.float32)
        outputs = self._session.run(None, {self._input_name: blob})
        faces = decode_scrfd(outputs, self.input_size, self.score_threshold, self.nms_threshold)
        for face in faces:  # back to the photo's pixels
            face.box = tuple(v / scale for v in face.box)
            face.landmarks = face.landmarks / scale
        return faces


def decode_scrfd(outputs: Sequence[np.ndarray], input_size: int, score_threshold: float,
                 nms_threshold: float, strides: Sequence[int] = (8, 16, 32),
                 anchors_per_cell: int = 2) -> list[FaceDetection]:
    """SCRFD's raw outputs (scores, box distances, keypoint offsets per stride, in units of the
    stride, anchors at cell corners) -> detections in input pixels, best first, after NMS."""
    levels = len(strides)
    if len(outputs) != 3 * levels:
        raise ValueError(f"this SCRFD model has {len(outputs)} outputs; expected {3 * levels} "
                         "(scores, boxes and 5 keypoints at 3 strides, as det_10g.onnx has).")
    scores, boxes, keypoints = [], [], []
    for level, stride in enumerate(strides):
        cells = input_size // stride
        ys, xs = np.mgrid[:cells, :cells]
        centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, anchors_per_cell, 0)
        score = np.asarray(outputs[level]).reshape(-1)
        dist = np.asarray(outputs[level + levels]).reshape(-1, 4) * stride
        kps = np.asarray(outputs[level + 2 * levels]).reshape(-1, 10) * stride
        keep = score >= score_threshold
        c = centres[keep].astype(np.float32)
        scores.append(score[keep])
        boxes.append(np.concatenate([c - dist[keep][:, :2], c + dist[keep][:, 2:]], axis=1))
        keypoints.append(c[:, None, :] + kps[keep].reshape(-1, 5, 2))
    score, box, kps = (np.concatenate(v) for v in (scores, boxes, keypoints))
    order = _nms(box, score, nms_threshold)
    return _detections(box[order], score[order], kps[order])


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    from torchvision.ops import nms
    if len(boxes) == 0:
        return []
    return nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), threshold).tolist()


def find_scrfd(weights_dir: Path | None = None) -> Path | None:
    return find_weight(SCRFD_FILES, insightface_pack_dirs(weights_dir))


def load_detector(name: str = "auto", device: str | torch.device = "cpu",
                  weights_dir: Path | None = None) -> FaceDetector:
    """"auto": SCRFD when an InsightFace pack with det_10g.onnx is present, else MTCNN."""
    if name not in ("auto", "mtcnn", "scrfd"):
        raise ValueError(f"unknown face detector {name!r}; choose auto, mtcnn or scrfd.")
    if name in ("auto", "scrfd"):
        path = find_scrfd(weights_dir)
        if path is not None:
            return SCRFDDetector(path)
        if name == "scrfd":
            raise FileNotFoundError(
                "the scrfd detector needs det_10g.onnx from an InsightFace pack (buffalo_l or "
                "antelopev2) unpacked to models/insightface/models/<pack>/ (beside or inside the "
                "face-recognizer weights folder). InsightFace's pretrained models are for "
                "non-commercial research only. Or use the mtcnn detector (no download needed).")
    return MTCNNDetector(device)


def landmarks_tensor(detections: Sequence[Sequence[FaceDetection]]) -> Tensor:
    """[B,5,2] landmarks of the best face of every image; error naming the images without one."""
    missing = [i for i, faces in enumerate(detections) if not faces]
    if missing:
        raise ValueError(f"no face found in image(s) at index {missing}; every image needs a face.")
    return torch.from_numpy(np.stack([faces[0].landmarks for faces in detections])).float()
