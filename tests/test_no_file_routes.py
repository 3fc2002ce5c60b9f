"""Issue 5: the pack adds no HTTP route (nothing on disk is served by it), and the web extension
only listens to the figures the nodes send; it never requests anything from the server."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_PYTHON = [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py"))]
WEB = sorted((REPO / "web").glob("*.js"))


def test_no_server_routes_in_the_pack():
    assert PACK_PYTHON and all(p.is_file() for p in PACK_PYTHON)
    pattern = re.compile(r"\.routes\b|add_route|add_static|aiohttp|web\.(get|post|static)\(")
    hits = [f"{p.name}:{n}" for p in PACK_PYTHON for n, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


def test_web_extension_only_receives_events():
    assert WEB
    source = "\n".join(p.read_text() for p in WEB)
    assert "addEventListener" in source and "iddm.progress" in source
    assert not re.search(r"\bfetch\s*\(|fetchApi|XMLHttpRequest|WebSocket\(|/view\?|/userdata", source)
