"""The privacy report page, `iddm report`, and the sweep page: self-contained, complete, private."""
from __future__ import annotations

import argparse
import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_iddm.config import KNOBS, IDDMConfig
from comfyui_iddm.report import PAPER_TABLE5, PLOT_NAMES, headline, strip_image, write_report_html


def sample_report(held_out: bool = True) -> dict:
    config = IDDMConfig(iterations=2, pgd_steps=5, rho=0.4, eta=0.08, resolution=64)
    identity = [{"recognizer": "dlib_resnet", "role": "surrogate", "before": 0.93, "after": 0.41}]
    if held_out:
        identity.append({"recognizer": "mobilefacenet", "role": "held-out", "before": 0.88, "after": 0.62})
    iterations = [{"stage1_loss": [1.0 - 0.1 * k, 0.9 - 0.1 * k], "stage2_score": [0.8 - 0.1 * k, 0.7 - 0.1 * k,
                   0.6 - 0.1 * k], "ft_loss": [0.5, 0.45, 0.4, 0.38], "seconds": 2.5 + k} for k in range(2)]
    return {"iddm_version": "0.1.0", "config": config.to_dict(), "photos": {"reference": 4, "protection": 4},
            "iterations": iterations, "decoupled": {"linf": 0.08, "psnr": 31.234, "ssim": 0.8123},
            "identity": identity, "seconds_total": 6.75}


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def assert_self_contained(page: str) -> None:
    """Nothing the browser would fetch: every src is a data: URI; no stylesheet/script links."""
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<link\b|<script\b|@import|url\(", page, re.IGNORECASE)
    assert not re.search(r'href="(?!#)', page)


X0 = torch.rand(5, 3, 32, 40, generator=torch.Generator().manual_seed(0))
X1 = (X0 + 0.05 * torch.randn(X0.shape, generator=torch.Generator().manual_seed(1)).sign()).clamp(0, 1)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, str]:
    """One page with the photo strip (rendering the plots is the slow part: done once)."""
    out = tmp_path_factory.mktemp("report") / "out"
    page = write_report_html(sample_report(), out, strip=(X0, X1)).read_text(encoding="utf-8")
    return out, page


def test_page_is_self_contained_with_plots_beside_it(written) -> None:
    out, page = written
    assert_self_contained(page)
    images = embedded_images(page)
    assert len(images) == len(PLOT_NAMES) + 1  # the plots and the strip
    for name in PLOT_NAMES:
        beside = (out / name).read_bytes()
        assert beside in images
        assert Image.open(io.BytesIO(beside)).format == "PNG"
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOT_NAMES, "report.html"])  # strip: page only
    assert str(out) not in page and str(out.parent) not in page  # never a path


def test_page_shows_the_figures_roles_and_the_paper(written) -> None:
    _, page = written
    report = sample_report()
    for text in ("31.2", "0.812", "0.930", "0.410", "-0.520", "0.880", "0.620", "-0.260", "6.8 s"):
        assert text in page, text
    assert 'class="surrogate"' in page and 'class="heldout"' in page
    for eta, (psnr, ssim) in PAPER_TABLE5.items():
        assert f"<td>{eta:g}</td><td>{psnr:.1f}</td><td>{ssim:.2f}</td>" in page
    for name in report["config"]:  # every knob with what it trades
        assert f"<td>{name}</td>" in page
        assert KNOBS[name].help.split(".")[0].replace("'", "&#x27;") in page


def test_strip_shows_original_protected_and_difference(written) -> None:
    png = strip_image(X0, X1)
    img = torch.from_numpy(np.array(Image.open(io.BytesIO(png)))).float() / 255
    assert img.shape == (4 * 32, 3 * 40, 3)  # at most 4 rows, three panels each
    assert torch.allclose(img[:32, :40].permute(2, 0, 1), X0[0], atol=1 / 255 + 1e-6)
    assert torch.allclose(img[:32, 40:80].permute(2, 0, 1), X1[0], atol=1 / 255 + 1e-6)
    diff = img[:, 80:]
    assert diff.min() < 0.1 and diff.max() > 0.9  # amplified to the full range
    assert png in embedded_images(written[1])
    with pytest.raises(ValueError, match="same shape"):
        strip_image(X0, X1[:, :, :16])


def test_headline_warns_when_no_held_out_evaluator() -> None:
    lines = headline(sample_report(held_out=False))
    assert any("No held-out recognizer" in line for line in lines)
    assert not any("No held-out" in line for line in headline(sample_report()))


def test_report_without_stage2_or_identity_still_renders(tmp_path: Path) -> None:
    report = sample_report()
    report["identity"] = []
    for it in report["iterations"]:
        it["stage2_score"] = []
    page = write_report_html(report, tmp_path).read_text(encoding="utf-8")
    assert "No recognizer measured" in page
    assert "No held-out recognizer" in page
    assert "Not shown" in page  # the strip is opt-in
    assert len(embedded_images(page)) == 2
    assert not (tmp_path / "plot_identity.png").exists()
    assert_self_contained(page)


def run_command(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_iddm_report_regenerates_the_page(tmp_path: Path, capsys) -> None:
    from comfyui_iddm.commands import report as report_command

    source = tmp_path / "run" / "report.json"
    source.parent.mkdir()
    source.write_text(json.dumps(sample_report()))
    assert run_command(report_command, ["report", str(source)]) == 0
    assert (source.parent / "report.html").is_file()  # default: beside the JSON
    assert "report written" in capsys.readouterr().out

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON report"):
        run_command(report_command, ["report", str(bad)])
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an IDDM report"):
        run_command(report_command, ["report", str(bad)])


def test_sweep_page_plots_each_rho(tmp_path: Path) -> None:
    from comfyui_iddm.sweep import write_sweep_html

    points = []
    for rho, psnr, after in ((0.1, 30.5, 0.3), (0.3, 31.5, 0.45), (0.5, 33.0, 0.6)):
        report = sample_report()
        points.append({"rho": rho, "decoupled": {"linf": 0.08, "psnr": psnr, "ssim": 0.8},
                       "identity": [dict(r, after=after) for r in report["identity"]], "seconds": 10.0})
    sweep = {"config": sample_report()["config"], "photos": {"reference": 4, "protection": 4}, "points": points}
    page = write_sweep_html(sweep, tmp_path).read_text(encoding="utf-8")
    assert_self_contained(page)
    assert (tmp_path / "sweep.png").read_bytes() in embedded_images(page)
    for rho in ("0.1", "0.3", "0.5"):
        assert f"<td>{rho}</td>" in page
    assert "0.930 → 0.300" in page and "mobilefacenet (held-out)" in page


def test_run_sweep_trains_each_rho(tmp_path: Path, test_recognizer) -> None:
    from conftest import synthetic_photos, tiny_config

    from comfyui_iddm.photos import photoset_from_images, split_photos
    from comfyui_iddm.sweep import run_sweep

    photos = photoset_from_images(synthetic_photos(4, 64), 64)
    reference, protection = split_photos(photos, 2)
    config = tiny_config(recognizers=test_recognizer, pgd_steps=4)
    sweep = run_sweep([0.0, 1.0], tmp_path, config, reference, protection, evaluators=[test_recognizer],
                      log=lambda line: None)
    assert [p["rho"] for p in sweep["points"]] == [0.0, 1.0]
    assert {p.name for p in tmp_path.iterdir()} == {"lora_rho0.safetensors", "lora_rho1.safetensors",
                                                    "sweep.json", "sweep.png", "sweep.html"}
    assert json.loads((tmp_path / "sweep.json").read_text())["points"] == sweep["points"]
    # rho 1: Stage I only, the identity is not attacked; rho 0: all Stage II, it is.
    after = {p["rho"]: p["identity"][0]["after"] for p in sweep["points"]}
    assert after[0.0] < after[1.0]


def test_the_run_is_placed_on_the_measured_privacy_curve(written) -> None:
    """Held-out first, each as 1 - after/before; the curve shipped with the engine is non-empty,
    ordered by eta, and its points are figures (PSNR in dB, drops as fractions)."""
    from comfyui_iddm.fidelity_curve import CURVES
    from comfyui_iddm.report import relative_drops

    drops = relative_drops(sample_report())
    assert [d[:2] for d in drops] == [("mobilefacenet", "held-out"), ("dlib_resnet", "surrogate")]
    assert [d[2] for d in drops] == pytest.approx([1 - 0.62 / 0.88, 1 - 0.41 / 0.93])
    assert CURVES and all(len(points) >= 3 for points in CURVES.values())
    for points in CURVES.values():
        assert [p.eta for p in points] == sorted(p.eta for p in points)
        assert all(20 < p.psnr < 60 and 0 <= p.held_out_drop < 1 for p in points)
    _, page = written
    assert "Where this run sits on the trade-off" in page
