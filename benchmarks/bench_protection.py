"""Model-side against photo-side protection on the tiny model: APDM (and its naive loss) beside the
cloaks (ASPL, same-budget noise, RID with --rid-weights), the same DreamBooth-LoRA attacker and the same
evaluation (protection_eval.py), over several seeds, with the attacker's photos as published and after
resizing + JPEG.

    python benchmarks/bench_protection.py --person /work/photos/obama [--seeds 0,1,2] [--json OUT]

The people, all from photos on this machine: the person to protect (--person: the first photos are
published and attacked, the last --held-out are what the attacker's model is measured on); the class
images of APDM (DPO's preferred side, prior preservation) are the faces of insightface's t1.jpg but the
demo's; the demo's sample face (comfyui_iddm.demo.sample_private_set) is the different person whom the
protected model must still learn; Tom Hanks (insightface) and the astronaut (scikit-image) are the other
people whose photos it must still denoise; five scikit-image pictures are the generic images.

The base model: `tiny` whose UNet first learns to denoise the class faces and the other people
(--pretrain-steps at lr 1e-3, then two thirds as many at 1e-4; every UNet weight): a protected model
must keep what its base can do, and a random UNet can do nothing. Everything runs in this process;
nothing is written but --json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common import machine

GENERIC = ("coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png")  # scikit-image's
TRANSFORMS = ("none", "jpeg:75,resize:0.5")
SUBJECT_ROWS = ("no attack (base model)", "none", "noise", "aspl", "rid")


def face_crops(image, detector, resolution: int, skip=None) -> list[torch.Tensor]:
    from comfyui_iddm.photos import MIN_FACE_SIDE, pil_to_tensor, square_crop

    crops = []
    for face in detector.detect(pil_to_tensor(image)[None])[0]:
        if face.size >= MIN_FACE_SIDE and (skip is None or not torch.equal(torch.as_tensor(face.box),
                                                                          torch.as_tensor(skip.box))):
            crops.append(pil_to_tensor(square_crop(image, face.box, face.landmarks, resolution)[0]))
    return crops


def people(resolution: int, held_out: int, person: Path):
    """(published, held-out, class faces, other people's faces, different person (published, held-out),
    generic images), all [N,3,R,R] in [0,1] (PhotoSets where landmarks are needed)."""
    import skimage.data

    from comfyui_iddm.class_images import fit_class_images
    from comfyui_iddm.demo import frontal_face, sample_private_set
    from comfyui_iddm.faces.detect import MTCNNDetector
    from comfyui_iddm.photos import load_photo_folder, pil_to_tensor, read_image
    from comfyui_iddm.samples import GROUP_PHOTO, SINGLE_FACE, load_sample_photo
    from PIL import Image

    detector = MTCNNDetector()
    subject = load_photo_folder(person, resolution, detector)
    if len(subject) <= held_out:
        sys.exit(f"--person has {len(subject)} usable photo(s); more than --held-out {held_out} are needed.")
    group = load_sample_photo(GROUP_PHOTO)
    demo_face = frontal_face(detector.detect(pil_to_tensor(group)[None])[0])
    classes = torch.stack(face_crops(group, detector, resolution, skip=demo_face))
    others = torch.stack(face_crops(load_sample_photo(SINGLE_FACE), detector, resolution)
                         + face_crops(Image.fromarray(skimage.data.astronaut()), detector, resolution))
    different = sample_private_set(resolution, detector, count=6)
    pictures = Path(skimage.data.__file__).parent
    generic = torch.cat([fit_class_images(pil_to_tensor(read_image(pictures / name))[None], resolution)
                         for name in GENERIC])
    n = len(subject)
    return (subject.subset(range(n - held_out)), subject.subset(range(n - held_out, n)), classes, others,
            (different.subset(range(3)), different.subset(range(3, len(different)))), generic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--person", type=Path, required=True, help="photos of the person to protect")
    parser.add_argument("--held-out", type=int, default=2, help="of them, the last N are held out (default 2)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--attack-steps", type=int, default=400)
    parser.add_argument("--apdm-iterations", type=int, default=40)
    parser.add_argument("--apdm-steps", type=int, default=5, help="APDM ft_steps (simulated personalization)")
    parser.add_argument("--apdm-lr", type=float, default=5e-5)
    parser.add_argument("--aspl-iterations", type=int, default=50, help="ASPL's outer iterations (Anti-DreamBooth: 50)")
    parser.add_argument("--rid-weights", type=Path, default=None, help="a trained RID network (iddm rid-train)")
    parser.add_argument("--weights-dir", type=Path, default=None, help="face-recognizer weights (x0 cosine)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)

    from comfyui_iddm.apdm import APDMConfig, run_apdm
    from comfyui_iddm.apdm_weights import Protection, apply_protection
    from comfyui_iddm.attack import attack_config
    from comfyui_iddm.backends.diffusers_backend import load_denoiser
    from comfyui_iddm.backends.tiny import pretrain
    from comfyui_iddm.cloak import cloak_config
    from comfyui_iddm.faces.registry import load_recognizers, resolve_names
    from comfyui_iddm.photo_transforms import PhotoTransform
    from comfyui_iddm.protection_eval import EvaluationSetup, ProtectedModel, UtilitySets, evaluate_protection

    R = args.resolution
    published, held_out, classes, others, different, generic = people(R, args.held_out, args.person)
    recognizers = load_recognizers(resolve_names(("auto",), args.weights_dir), args.weights_dir, "cpu")
    methods = ["none", "noise", "aspl"] + (["rid"] if args.rid_weights else [])
    print(f"{len(published)} published + {len(held_out)} held-out photos of the person; {len(classes)} class "
          f"faces; {len(others)} other people; a different person {len(different[0])} + {len(different[1])}; "
          f"{len(generic)} generic images; {R} px; recognizers {[r.name for r in recognizers]}", flush=True)

    started = time.perf_counter()
    base = load_denoiser("tiny", APDMConfig(resolution=R).fine_tune_config())
    faces = torch.cat([classes, others])
    # Then a tenth of the rate: a base close to converged, so protecting it teaches no general denoising.
    losses = pretrain(base, faces, args.pretrain_steps) + pretrain(base, faces, args.pretrain_steps * 2 // 3, lr=1e-4)
    pretrained = {name: p.detach().clone() for name, p in base.unet_parameters().items()}
    print(f"tiny base pretrained: loss {statistics.mean(losses[:20]):.4f} -> {statistics.mean(losses[-50:]):.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        models = []
        for loss in ("dpo", "naive"):
            config = APDMConfig(iterations=args.apdm_iterations, ft_steps=args.apdm_steps, lr=args.apdm_lr,
                                resolution=R, seed=seed, protect_loss=loss)
            denoiser = load_denoiser("tiny", config.fine_tune_config())
            apply_protection(denoiser, Protection("unet", pretrained, None))
            result = run_apdm(denoiser, published.images, config, class_images=classes)
            print(f"seed {seed} APDM {loss}: {result.seconds_total:.0f} s, {result.figures}", flush=True)
            models.append(ProtectedModel(f"APDM {loss}", Protection("unet", result.weights, config.to_dict())))
        for transform in TRANSFORMS:
            denoiser = load_denoiser("tiny", attack_config(seed=seed, resolution=R))
            apply_protection(denoiser, Protection("unet", pretrained, None))
            setup = EvaluationSetup(attack=attack_config(seed=seed, resolution=R, ft_steps=args.attack_steps),
                                    cloak=cloak_config(seed=seed, resolution=R, iterations=args.aspl_iterations),
                                    transform=PhotoTransform.parse(transform))
            utility = UtilitySets(others, generic, different) if transform == "none" else None
            rows = evaluate_protection(denoiser, published, held_out, methods, recognizers, setup,
                                       rid_weights=args.rid_weights, protected_models=models, utility=utility,
                                       log=lambda message: print(f"  seed {seed} [{transform}] {message}", flush=True))
            results.append({"seed": seed, "transform": transform, "rows": [row_figures(r) for r in rows]})
    print(f"\ntotal {time.perf_counter() - started:.0f} s\n")
    print(format_tables(results, [r.name for r in recognizers], args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def row_figures(row) -> dict:
    return {"method": row.method, "denoise_loss": row.denoise_loss, "x0_cosine": row.x0_cosine,
            "utility": row.utility, "seconds_per_photo": row.seconds_per_photo}


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"


def format_tables(results: list[dict], names: list[str], args) -> str:
    seeds = sorted({r["seed"] for r in results})
    lines = [f"The attacker's model on the person's held-out photos (mean ± sd over seeds {seeds}; "
             f"DreamBooth-LoRA, {args.attack_steps} steps; lower loss / higher x0 cosine = it learnt the person)",
             "",
             "| protection | attacker's photos | denoise loss | vs none, same seed | "
             + " | ".join(f"x0 {n}" for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    methods = [m["method"] for m in results[0]["rows"]]
    for method in methods:
        for transform in TRANSFORMS:
            runs = [r for r in results if r["transform"] == transform]
            rows = [row for r in runs for row in r["rows"] if row["method"] == method]
            if not rows or (method.startswith("no attack") and transform != "none"):
                continue
            none = [row for r in runs for row in r["rows"] if row["method"] == "none"]
            change = [100 * (row["denoise_loss"] / base["denoise_loss"] - 1) for row, base in zip(rows, none)]
            label = method if not method.startswith("APDM") else f"{method} (protected model)"
            photos = "clean" if transform == "none" else "resize 0.5 + JPEG q75"
            lines.append(f"| {label} | {photos} | {spread([r['denoise_loss'] for r in rows], '.4f')} | "
                         f"{spread(change, '+.3f')}% | "
                         + " | ".join(spread([r["x0_cosine"][n] for r in rows], ".3f") for n in names) + " |")
    lines += ["", "What each protected model still does (change against the base model; mean ± sd over seeds):", "",
              "| protected model | the person, before any attack | other people's photos | generic images | "
              "a different person, after the same attack |", "|---|---|---|---|---|"]
    for method in (m for m in methods if m.startswith("APDM")):
        rows = [row for r in results if r["transform"] == "none" for row in r["rows"] if row["method"] == method]
        base = [row for r in results if r["transform"] == "none" for row in r["rows"]
                if row["method"].startswith("no attack")]
        before = [row["utility"]["before_attack"]["denoise_loss"] / b["denoise_loss"] - 1 for row, b in zip(rows, base)]
        cells = [spread([100 * v for v in before], "+.2f") + "%"]
        for name in ("other_people", "generic", "different_person"):
            cells.append(spread([100 * row["utility"][name]["change"] for row in rows], "+.2f") + "%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
