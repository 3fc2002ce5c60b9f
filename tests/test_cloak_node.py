"""IDDM Cloak Photos without ComfyUI: its declaration (defaults are the cloak's, tooltips the engine's,
the methods the registry's) and the report it leaves in ComfyUI's history. (tests/comfyui/ runs it
on a real server.)"""
from __future__ import annotations

import json

import pytest
import torch

import pack_nodes
from comfyui_iddm.cloak import CLOAK_DEFAULTS, METHODS, CloakRequest, cloak_config, make_cloak, run_cloak
from comfyui_iddm.config import KNOBS

spec = pack_nodes.load("spec")
convert = pack_nodes.load("convert")


def test_cloak_node_is_declared_with_the_cloaks_own_defaults():
    node = spec.BY_ID["IDDMCloakPhotos"]
    assert node in spec.ALL_NODES and node.display_name == "IDDM Cloak Photos"
    assert [p.type for p in node.outputs] == ["IMAGE", "STRING"]
    knobs = {p.name: p for p in node.inputs if p.name in KNOBS}
    for name, port in knobs.items():
        assert port.tooltip == KNOBS[name].help
    assert {name: knobs[name].default for name in ("iterations", "pgd_steps", "ft_steps", "eta", "pgd_alpha")} == \
        {name: CLOAK_DEFAULTS[name] for name in ("iterations", "pgd_steps", "ft_steps", "eta", "pgd_alpha")}
    config = cloak_config(resolution=512, **{name: port.default for name, port in knobs.items()})
    assert config.budget[0] == pytest.approx(0.025)  # Anti-DreamBooth's 0.05 in [-1,1] units


def test_cloak_node_offers_registered_methods_and_asks_aspl_for_a_model():
    node = spec.CLOAK
    method = node.input("method")
    assert set(method.options) <= set(METHODS) and method.default == "aspl" and "noise" in method.options
    assert all(node.input(name).optional for name in ("model", "clip", "vae"))  # noise needs no model


def test_cloak_report_holds_settings_and_figures_only():
    config = cloak_config(resolution=64)
    photos = torch.rand(2, 3, 64, 64)
    for method in ("none", "noise"):
        report = json.loads(convert.cloak_report(method, config, run_cloak(make_cloak(CloakRequest(method, config)), photos)))
        assert report["method"] == method and report["photos"] == 2
        assert report["budget_0_1"] == pytest.approx(0.025)
        assert set(report["figures"]) == {"linf", "psnr", "ssim"}
        assert report["settings"]["iterations"] == CLOAK_DEFAULTS["iterations"]
    assert report["figures"]["psnr"] > 30
    unchanged = json.loads(convert.cloak_report("none", config, run_cloak(make_cloak(CloakRequest("none", config)), photos)))
    assert unchanged["figures"]["psnr"] is None  # valid JSON: no Infinity
