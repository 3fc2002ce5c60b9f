"""RID end to end on the tiny model: train the cloaking network on faces made offline, then measure
its cloak against the attacker with `iddm evaluate-protection` (beside no defense, same-budget noise
and ASPL), on photos of a person the network never saw.

Training faces (a smoke test, not the paper's data): every face of the sample photos that ship in the
insightface wheel (t1.jpg: 6 people; Tom_Hanks_54745.png: 1), each augmented into --per-face variations
(scale/shift crops, mirror images, small rotations, colour changes: demo.augmented_photos). The
authors trained on VGGFace2 (thousands of people) for 7 days on 8 A100s; this run takes an hour
on 2 CPU cores, so it shows the method works end to end, not the authors' protection strength.
The person to protect: --person DIR (e.g. a folder of real photos of one person), split into the
published photos (cloaked, attacked) and held-out clean ones (measured).

    python benchmarks/rid_protection.py --person PHOTOS_DIR --work /tmp/rid-run \
        [--eval-args "--weights-dir WEIGHTS"] [--steps 1000]

Everything it writes (the training faces, the network) goes under --work, never into the repository.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, machine

SAMPLES = ("t1.jpg", "Tom_Hanks_54745.png")
MIN_FACE = 40  # px: smaller faces of the sample photos are too blurred to teach anything


def make_training_faces(folder: Path, per_face: int, seed: int) -> int:
    """Writes the augmented sample faces (256 px PNGs) into `folder`; returns how many."""
    from PIL import Image

    from comfyui_iddm.demo import augmented_photos
    from comfyui_iddm.faces.detect import MTCNNDetector
    from comfyui_iddm.photos import pil_to_tensor
    from comfyui_iddm.samples import load_sample_photo

    folder.mkdir(parents=True, exist_ok=True)
    detector, count = MTCNNDetector(), 0
    for sample in SAMPLES:
        image = load_sample_photo(sample)
        faces = [f for f in detector.detect(pil_to_tensor(image)[None])[0] if f.size >= MIN_FACE]
        for person, face in enumerate(faces):
            for i, region in enumerate(augmented_photos(image, face.box, per_face, seed + person)):
                region.resize((256, 256), Image.Resampling.LANCZOS).save(
                    folder / f"{Path(sample).stem}_{person}_{i:03d}.png")
                count += 1
    return count


def iddm(*args: str) -> None:
    command = [sys.executable, "-m", "comfyui_iddm.cli", *args]
    print("$ iddm " + " ".join(args), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--person", type=Path, required=True, help="photos of one person to protect")
    parser.add_argument("--work", type=Path, required=True, help="folder for everything this run writes")
    parser.add_argument("--per-face", type=int, default=40, help="augmented variations per sample face")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000, help="rid-train steps")
    # On tiny, Adv-SDS finds nothing to push against (a random UNet: SDS drops the UNet's Jacobian,
    # which stands in for the loss gradient only in a model that has learnt images), so what the
    # network can learn comes from the regulariser, ASPL's pairs: weigh it up and learn faster.
    parser.add_argument("--lr", type=float, default=1e-3, help="rid-train learning rate")
    parser.add_argument("--reg-weight", type=float, default=1000.0, help="rid-train regulariser weight")
    parser.add_argument("--pairs", default="aspl", choices=["aspl", "none"])
    parser.add_argument("--rid-args", default="", help="more rid-train flags, e.g. '--reg-weight 100'")
    parser.add_argument("--eval-args", default="", help="more evaluate-protection flags")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(machine())

    faces = args.work / "training-faces"
    if not faces.is_dir():
        print(f"training faces: {make_training_faces(faces, args.per_face, args.seed)} written to {faces}")
    network = args.work / "rid.safetensors"
    iddm("rid-train", str(faces), "--base", "tiny", "--out", str(network), "--overwrite",
         "--resolution", str(args.resolution), "--steps", str(args.steps), "--pairs", args.pairs,
         "--lr", str(args.lr), "--reg-weight", str(args.reg_weight),
         "--threads", str(args.threads), "--seed", str(args.seed), *args.rid_args.split())
    iddm("evaluate-protection", "--clean", str(args.person), "--base", "tiny", "--method", "noise,aspl,rid",
         "--rid-weights", str(network), "--resolution", str(args.resolution), "--seed", str(args.seed),
         "--threads", str(args.threads), "--json", *args.eval_args.split())


if __name__ == "__main__":
    main()
