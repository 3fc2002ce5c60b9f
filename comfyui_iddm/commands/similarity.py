"""`iddm similarity`: how strongly do these images show the person in the reference photos?

Prints, per image, whether a face was found, its cosine similarity to the person's prototype under
each recognizer and the verdict against that recognizer's same-person threshold (faces/same_person.py
says where each threshold comes from), then the summary: FSR and the mean cosine per recognizer.
Unreadable images are skipped with the reason, as `iddm train` does. File names are printed for the
user's own terminal only; nothing is written to disk.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from ..config import parse_list
from ..faces.same_person import threshold_for, verdict
from ..photos import IMAGE_SUFFIXES, UnreadablePhoto, pil_to_tensor, read_image

# Detection cost grows with the pixel count; faces in larger photos are plenty big at this size.
MAX_SIDE = 1024


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "similarity", help="face similarity of images to the person in reference photos",
        description="Cosine similarity of the face in each image to the identity prototype (the "
                    "normalized mean embedding of the reference faces), per face recognizer, and "
                    "the face success rate (FSR), with a verdict per image: a recognizer takes the face "
                    "for the same person when the cosine reaches its same-person threshold (printed with "
                    "its source). Lower similarity = harder to link to the person.")
    p.add_argument("--reference", required=True, type=Path, help="photos of the person: a folder or one file")
    p.add_argument("--images", required=True, type=Path, help="images to measure: a folder or one file")
    p.add_argument("--recognizers", default="auto",
                   help="comma-separated: irse50, ir152, mobilefacenet, facenet, arcface, dlib_resnet, "
                        "or auto (every one whose weights are present; default)")
    p.add_argument("--surrogates", default=None,
                   help="recognizers the images were optimized against (warns if also measured here)")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with face-recognizer weights (default $IDDM_WEIGHTS_DIR or the user cache)")
    p.add_argument("--detector", choices=["auto", "mtcnn", "scrfd"], default="auto",
                   help="face detector (auto: SCRFD if an InsightFace pack is present, else MTCNN)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..faces.detect import load_detector
    from ..faces.ensemble import IdentityEnsemble
    from ..faces.registry import load_recognizers, resolve_names
    from ..metrics import evaluator_overlap, identity_similarity

    names = resolve_names(parse_list(args.recognizers), args.weights_dir)
    if args.surrogates:
        evaluator_overlap(names, parse_list(args.surrogates))
    detector = load_detector(args.detector, device=args.device, weights_dir=args.weights_dir)
    recognizers = load_recognizers(names, args.weights_dir, args.device)

    ref_files, ref_images = read_images(args.reference)
    ref_faces = [detector.detect(img[None])[0] for img in ref_images]
    usable = [i for i, faces in enumerate(ref_faces) if faces]
    for i in sorted(set(range(len(ref_files))) - set(usable)):
        print(f"reference {ref_files[i].name}: no face found, not used", file=sys.stderr)
    if not usable:
        raise ValueError(f"no face found in any reference photo in {args.reference}; use clear, "
                         "front-facing photos of the person.")
    ensemble = IdentityEnsemble.from_reference(
        recognizers, [ref_images[i].to(args.device) for i in usable],
        [torch.as_tensor(ref_faces[i][0].landmarks).to(args.device) for i in usable], tau=1.0)

    files, images = read_images(args.images)
    report = identity_similarity(ensemble, images, [detector.detect(img[None])[0] for img in images])
    thresholds = {r.name: threshold_for(r.name, int(p.shape[0])) for r, p in zip(recognizers, ensemble.prototypes)}
    rows = [{"file": f.name, "face": row is not None,
             "cosine": dict(zip(report.names, (round(v, 4) for v in row))) if row else None,
             "same_person": ({n: verdict(v, thresholds[n]) == "same person" for n, v in zip(report.names, row)
                              if thresholds[n] is not None} if row else None),
             "verdict": image_verdict(row, report.names, thresholds)}
            for f, row in zip(files, report.per_image)]
    summary = {"recognizers": list(report.names), "reference_faces": len(usable),
               "fsr": round(report.fsr, 4),
               "mean_cosine": {k: (round(v, 4) if v is not None else None) for k, v in report.mean.items()},
               "thresholds": {n: ({"cosine": t.cosine, "source": t.source} if t else None)
                              for n, t in thresholds.items()},
               "images": rows}
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def image_verdict(row: list[float] | None, names, thresholds) -> str:
    """One image: 'no face', 'same person' (some recognizer links it to the person), 'different
    person' (every recognizer with a threshold does not), or 'no threshold' (none has one)."""
    if row is None:
        return "no face"
    said = [verdict(v, thresholds[n]) for n, v in zip(names, row) if thresholds[n] is not None]
    if not said:
        return "no threshold"
    return "same person" if "same person" in said else "different person"


def format_table(summary: dict) -> str:
    names, thresholds = summary["recognizers"], summary["thresholds"]
    width = max([len(r["file"]) for r in summary["images"]] + [5])
    column = max([13] + [len(n) for n in names])
    lines = [f"{'image':<{width}}  face  " + "  ".join(f"{n:>{column}}" for n in names) + "  verdict"]
    for row in summary["images"]:
        cells = []
        for n in names:
            if not row["face"]:
                cells.append(f"{'-':>{column}}")
            else:
                mark = "" if thresholds[n] is None else (" same" if row["same_person"][n] else " diff")
                cells.append(f"{row['cosine'][n]:.3f}{mark}".rjust(column))
        lines.append(f"{row['file']:<{width}}  {'yes' if row['face'] else 'no ':<4}  " + "  ".join(cells)
                     + f"  {row['verdict']}")
    found = sum(r["face"] for r in summary["images"])
    lines.append(f"FSR {summary['fsr']:.3f} ({found}/{len(summary['images'])} images with a face); "
                 f"prototype from {summary['reference_faces']} reference face(s)")
    means = ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} -" for n, v in summary["mean_cosine"].items())
    lines.append(f"mean cosine to the person: {means}")
    linked = sum(r["verdict"] == "same person" for r in summary["images"])
    judged = sum(r["verdict"] in ("same person", "different person") for r in summary["images"])
    if judged:
        lines.append(f"verdict: {linked} of {judged} image(s) with a face taken for the same person by at "
                     "least one recognizer (lower is more private)")
    lines.append("same person when the cosine reaches (same = at or above, diff = below):")
    for n in names:
        t = thresholds[n]
        lines.append(f"  {n} {t['cosine']:.3f}: {t['source']}" if t else
                     f"  {n}: no known threshold, no verdict (cosines only)")
    return "\n".join(lines)


def read_images(path: Path) -> tuple[list[Path], list[torch.Tensor]]:
    """The images of a folder (name order, hidden files left out), or one image file. Unreadable
    ones are skipped with the reason on stderr, as `iddm train` does; none readable is an error."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}.")
    else:
        raise FileNotFoundError(f"{path} does not exist; give an image file or a folder of images.")
    kept, images = [], []
    for file in files:
        try:
            images.append(_read_image(file))
        except UnreadablePhoto as err:
            print(f"{file.name}: {err.reason} (skipped)", file=sys.stderr)
            continue
        kept.append(file)
    if not images:
        raise FileNotFoundError(f"no readable image in {path}; see the reasons above.")
    return kept, images


def _read_image(path: Path) -> torch.Tensor:
    """[3,H,W] in [0,1] through the engine's photo reader (EXIF, any mode, bad files refused with
    a reason), longer side at most MAX_SIDE."""
    img = read_image(path)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return pil_to_tensor(img)
