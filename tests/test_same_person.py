"""Same-person thresholds on real faces (insightface's t1.jpg: six different people; MTCNN; dlib's
ResNet from PyPI; the shared MobileFaceNet when present): the verdict of `iddm similarity`, and the
warning of `iddm train` when a photo folder holds more than one person."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_iddm.faces.same_person import THRESHOLDS, mixed_identity_warnings, same_person_groups, threshold_for
from comfyui_iddm.photos import tensor_to_pil

from conftest import run_cli_here

pytestmark = pytest.mark.realfaces


@pytest.fixture(scope="module")
def faces(mtcnn):
    """Six face-centred crops of six different people [6,3,224,224], another view of each, and the
    landmarks of both."""
    from test_faces_real import augment, face_crop, redetect

    from comfyui_iddm import samples
    try:
        photo = samples.group_photo()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    image = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float()[None] / 255
    crops = torch.cat([face_crop(image, f.box, 2.0, (0.0, 0.0)) for f in mtcnn.detect(image)[0]])
    views = augment(crops)
    return crops, redetect(mtcnn, crops), views, redetect(mtcnn, views)


@pytest.fixture(scope="module")
def recognizers():
    from test_faces_real import shared_weights_dir

    from comfyui_iddm.faces.registry import load_recognizers
    try:
        found = load_recognizers(["dlib_resnet"])
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"dlib's recognizer is not installed ({err})")
    if shared_weights_dir() is not None:
        found += load_recognizers(["mobilefacenet"], shared_weights_dir())
    return found


def run(argv):
    return run_cli_here([str(a) for a in argv])


def test_each_threshold_separates_different_people_from_the_same_person(faces, recognizers):
    """The documented values hold on real faces here: every pair of t1.jpg's six people is below the
    threshold, every person against another view of themselves is at or above it."""
    from comfyui_iddm.faces.ensemble import embed_faces

    crops, landmarks, views, view_landmarks = faces
    for recognizer in recognizers:
        with torch.no_grad():
            a, b = embed_faces(recognizer, crops, landmarks), embed_faces(recognizer, views, view_landmarks)
        threshold = threshold_for(recognizer.name, a.shape[1])
        different = (a @ a.T)[~torch.eye(6, dtype=torch.bool)]
        assert float(different.max()) < threshold.cosine <= float((a * b).sum(1).min()), recognizer.name
    assert all(t.source for t in THRESHOLDS.values())


def test_groups_join_through_any_same_person_link():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.28, 0.96], [-1.0, 0.0]]), dim=1)
    assert same_person_groups(e, 0.75) == [[0, 1, 2], [3]]  # 0-1 and 1-2 linked, 0-2 not
    assert same_person_groups(e, 0.99) == [[0], [1], [2], [3]]


def test_two_people_in_one_set_are_named_by_number(faces, recognizers):
    crops, landmarks, views, view_landmarks = faces
    images = torch.cat([crops[:1], views[:1], crops[3:4]])
    marks = torch.cat([landmarks[:1], view_landmarks[:1], landmarks[3:4]])
    warnings = mixed_identity_warnings(recognizers, images, marks, ["photo 1", "photo 2", "photo 3"])
    assert len(warnings) == 1  # the recognizers agree: one warning naming each one's figures
    assert warnings[0].startswith("photo 3 may show someone else than photos 1 and 2 (")
    assert all(f"{r.name}: cosine across at most" in warnings[0] for r in recognizers)
    one_person = torch.cat([crops[:1], views[:1]])
    assert mixed_identity_warnings(recognizers, one_person, torch.cat([landmarks[:1], view_landmarks[:1]]),
                                   ["photo 1", "photo 2"]) == []


def test_train_warns_before_training_when_the_folder_holds_two_people(faces, tmp_path):
    crops, _, views, _ = faces
    photos = tmp_path / "photos"
    photos.mkdir()
    tensor_to_pil(crops[0]).save(photos / "anna_beach.png")
    tensor_to_pil(views[0]).save(photos / "anna_home.png")
    tensor_to_pil(crops[3]).save(photos / "bob_party.png")
    report = tmp_path / "report.json"
    code, out, err = run(["train", photos, "--out", tmp_path / "lora.safetensors", "--base", "tiny",
                          "--detector", "mtcnn", "--resolution", "112", "--iterations", "1", "--ft-steps", "1",
                          "--pgd-steps", "0", "--reference", "1", "--recognizers", "none",
                          "--evaluators", "dlib_resnet", "--report", report])
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "photo 3 may show someone else than photos 1 and 2" in warning and "dlib_resnet" in warning
    assert "anna" not in warning and "bob" not in warning  # photos by number, never by file name
    assert err.index("warning:") < err.index("iteration 1")  # said before the training starts
    assert f"warning: {warning[len('warning: '):]}" in out  # and again in the summary
    assert json.loads(report.read_text())["warnings"] == [warning[len("warning: "):]]


def test_similarity_gives_a_verdict_per_image_with_each_threshold_and_its_source(faces, recognizers, tmp_path):
    crops, _, views, _ = faces
    (tmp_path / "ref").mkdir()
    (tmp_path / "img").mkdir()
    tensor_to_pil(views[0]).save(tmp_path / "ref" / "me.png")
    tensor_to_pil(crops[0]).save(tmp_path / "img" / "0_me.png")
    for i in range(1, 6):
        tensor_to_pil(crops[i]).save(tmp_path / "img" / f"{i}_other.png")
    (tmp_path / "img" / "9_broken.jpg").write_bytes(b"not a JPEG")

    code, out, err = run(["similarity", "--reference", tmp_path / "ref", "--images", tmp_path / "img",
                          "--recognizers", "dlib_resnet", "--detector", "mtcnn", "--json"])
    assert code == 0, err
    assert "9_broken.jpg: " in err and "(skipped)" in err  # as `iddm train` does
    result = json.loads(out)
    verdicts = {row["file"]: row["verdict"] for row in result["images"]}
    assert verdicts == {"0_me.png": "same person", **{f"{i}_other.png": "different person" for i in range(1, 6)}}
    threshold = result["thresholds"]["dlib_resnet"]
    assert threshold["cosine"] == 0.93 and "Euclidean distance < 0.6" in threshold["source"]
    assert all(row["same_person"]["dlib_resnet"] == (row["verdict"] == "same person") for row in result["images"])

    code, out, err = run(["similarity", "--reference", tmp_path / "ref" / "me.png",
                          "--images", tmp_path / "img" / "3_other.png", "--recognizers", "dlib_resnet",
                          "--detector", "mtcnn"])
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("3_other.png"))
    assert row.endswith("different person") and " diff " in row + " "
    assert any(line.strip().startswith("dlib_resnet 0.930: DeepFace's") for line in out.splitlines())
