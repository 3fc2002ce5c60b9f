"""`iddm audit FILE_OR_DIR`: before publishing, check images and workflow files for traces of the
private photos (paths, account names, photo file names, the photo folder, LoRA names, GPS).

Exit code 0: nothing found; 1: something found; 2: a file was not checked (unreadable, or in a folder
a kind of file this audit does not read), nothing was checked at all, or the path does not exist.
Values found are printed on the user's own terminal only; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..audit import KINDS, AuditResult, audit, home_user


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "audit", help="check images, workflows, LoRAs and HTML pages for paths, photo names and LoRA "
                      "names before sharing",
        description="Reads the metadata of PNG/JPEG/WebP images (ComfyUI embeds the whole graph in every "
                    "image the stock Save Image node writes), workflow JSON files, LoRA .safetensors "
                    "headers and HTML pages (with the images embedded in them), and reports what could "
                    "lead back to the private photos: absolute and home-folder paths, photo file names, "
                    "the photo folder of IDDM Load Private Photos, training-data folders, LoRA names that "
                    "are not the neutral iddm_<date>_<id>, hashes of files, GPS positions. In a folder, "
                    "every file of another kind (and every hidden one) is listed as not checked. Exit "
                    "code 1 when something is found, 2 when something was not checked.")
    p.add_argument("path", type=Path, metavar="FILE_OR_DIR",
                   help="an image, workflow, LoRA or HTML file, or a folder (searched recursively)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a list")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = audit(args.path)
    if result.files_checked == 0 and not result.skipped:
        raise FileNotFoundError(f"nothing to check: {args.path} holds no image, workflow, LoRA or HTML "
                                "file (and no other file).")
    print(json.dumps(as_json(result), indent=2) if args.json else format_result(result))
    if result.findings:
        return 1
    return 2 if result.skipped else 0


def as_json(result: AuditResult) -> dict:
    return {"files_checked": result.files_checked,
            "findings": [{**asdict(f), "why": f.why} for f in result.findings],
            "skipped": [{"file": file, "reason": reason} for file, reason in result.skipped]}


def format_result(result: AuditResult) -> str:
    lines, current = [], None
    for finding in result.findings:
        if finding.file != current:
            current = finding.file
            lines.append(current)
        account = home_user(finding.value) if finding.kind == "home_dir" else None
        extra = f" (account '{account}')" if account else ""
        lines.append(f"  {finding.kind}: {finding.value!r}{extra}\n      at {finding.where}")
    for file, reason in result.skipped:
        lines.append(f"{file}: not checked: {reason}")
    files = {f.file for f in result.findings}
    found = (f"{len(result.findings)} finding(s) in {len(files)} file(s)" if result.findings
             else "nothing found")
    lines.append(f"{result.files_checked} file(s) checked; {found}"
                 + (f"; {len(result.skipped)} not checked" if result.skipped else ""))
    kinds = sorted({f.kind for f in result.findings}, key=list(KINDS).index)
    if kinds:
        lines.append("Why these matter:")
        lines.extend(f"  {kind}: {KINDS[kind]}" for kind in kinds)
        lines.append("To publish images without any of this, save them with IDDM Save Public Image (no "
                     "metadata at all), or start ComfyUI with --disable-metadata.")
    return "\n".join(lines)
