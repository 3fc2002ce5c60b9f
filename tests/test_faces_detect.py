"""Detector port: SCRFD output decoding, per-photo face problems, detector selection."""
import numpy as np
import pytest

from comfyui_iddm.faces.detect import FaceDetection, decode_scrfd, landmarks_tensor, load_detector

INPUT = 64  # cells: 8 (stride 8), 4 (stride 16), 2 (stride 32); 2 anchors per cell


def _empty_outputs():
    cells = [(INPUT // s) ** 2 * 2 for s in (8, 16, 32)]
    return ([np.zeros((n, 1), np.float32) for n in cells] + [np.zeros((n, 4), np.float32) for n in cells]
            + [np.zeros((n, 10), np.float32) for n in cells])


def test_scrfd_decoding_by_hand():
    out = _empty_outputs()
    # stride 16, cell (x=2, y=1), second anchor -> row (1*4 + 2)*2 + 1 = 13, centre (32, 16)
    out[1][13] = 0.9
    out[4][13] = [1.0, 0.5, 1.5, 2.0]  # distances left, top, right, bottom in strides
    out[7][13] = np.arange(10) / 10.0
    # a weaker duplicate of the same face at stride 8 is suppressed; a low score is ignored
    row = (2 * 8 + 4) * 2  # cell (x=4, y=2) -> centre (32, 16)
    out[0][row] = 0.8
    out[3][row] = [2.0, 1.0, 3.0, 4.0]
    out[2][0] = 0.3
    faces = decode_scrfd(out, INPUT, score_threshold=0.5, nms_threshold=0.4)
    assert len(faces) == 1
    face = faces[0]
    assert face.score == pytest.approx(0.9)
    assert face.box == pytest.approx((32 - 16, 16 - 8, 32 + 24, 16 + 32))
    expected = np.array([32, 16]) + (np.arange(10) / 10.0 * 16).reshape(5, 2)
    assert np.allclose(face.landmarks, expected)


def test_scrfd_without_faces_and_with_a_foreign_model():
    assert decode_scrfd(_empty_outputs(), INPUT, 0.5, 0.4) == []
    with pytest.raises(ValueError, match="outputs"):
        decode_scrfd(_empty_outputs()[:6], INPUT, 0.5, 0.4)


def _face(size, score=0.99):
    return FaceDetection((10.0, 10.0, 10.0 + size, 10.0 + size * 1.2), np.zeros((5, 2), np.float32), score)


def test_landmarks_tensor_names_images_without_a_face():
    faces = [[_face(100)], [_face(80)]]
    faces[1][0].landmarks = np.ones((5, 2), np.float32)
    lm = landmarks_tensor(faces)
    assert lm.shape == (2, 5, 2) and lm[1].sum() == 10
    with pytest.raises(ValueError, match=r"\[1\]"):
        landmarks_tensor([[_face(100)], []])


def test_detector_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.insightface packs
    with pytest.raises(ValueError, match="unknown face detector"):
        load_detector("yolo")
    with pytest.raises(FileNotFoundError, match="det_10g.onnx"):
        load_detector("scrfd", weights_dir=tmp_path)
    pytest.importorskip("facenet_pytorch")
    assert load_detector("auto", weights_dir=tmp_path).name == "mtcnn"
