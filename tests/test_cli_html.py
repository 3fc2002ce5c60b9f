"""`iddm train --html DIR` writes the privacy report page; the photo strip only when asked."""
from __future__ import annotations

import base64
import re

from conftest import files_under, register_test_recognizer, run_cli_here, train_argv, write_photos

PLOTS = {"report.html", "plot_iterations.png", "plot_identity.png", "plot_quality.png"}


def _train(tmp_path, *extra):
    undo = register_test_recognizer()
    try:
        photos = tmp_path / "private_photos_of_ada"
        write_photos(photos, 4)
        out = tmp_path / "out"
        out.mkdir()
        code, _, stderr = run_cli_here(train_argv(photos, out / "p.safetensors", "--html", out / "page", *extra))
    finally:
        undo()
    assert code == 0, stderr
    return out / "page"


def _embedded_images(page: str) -> int:
    return len(re.findall(r"data:image/png;base64,", page))


def test_html_page_without_photos_by_default(tmp_path):
    page_dir = _train(tmp_path)
    assert PLOTS <= files_under(page_dir)
    page = (page_dir / "report.html").read_text()
    assert "private_photos_of_ada" not in page and str(tmp_path) not in page
    without = _embedded_images(page)

    with_photos = _train(tmp_path / "again", "--html-photos")
    page_photos = (with_photos / "report.html").read_text()
    assert _embedded_images(page_photos) == without + 1  # the X0 | X' | difference strip


def test_existing_page_is_refused_before_training(tmp_path):
    page_dir = _train(tmp_path)
    before = (page_dir / "report.html").read_bytes()
    undo = register_test_recognizer()
    try:
        code, _, stderr = run_cli_here(train_argv(tmp_path / "private_photos_of_ada", tmp_path / "out" / "q.safetensors",
                                                  "--html", page_dir))
    finally:
        undo()
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert (page_dir / "report.html").read_bytes() == before
    assert not (tmp_path / "out" / "q.safetensors").exists()
