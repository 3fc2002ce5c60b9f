"""IDDM Cloak Photos without ComfyUI: its declaration (defaults are the cloak's, tooltips the engine's,
the methods the registry's, rid's network list), rid refused without a network, and the report it
leaves in ComfyUI's history. (tests/comfyui/ runs it on a real server.)"""
from __future__ import annotations

import json
import re

import pytest
import torch

import pack_nodes
from comfyui_iddm.cloak import (CLOAK_DEFAULTS, CLOAK_KNOBS, METHOD_KNOBS, METHODS, CloakRequest, cloak_config,
                                make_cloak, run_cloak)
from comfyui_iddm.config import KNOBS, ConfigError
from conftest import random_rid_network

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
    assert set(method.options) <= set(METHODS) and method.default == "aspl"
    assert {"rid", "noise"} <= set(method.options)
    assert all(node.input(name).optional for name in ("model", "clip", "vae"))  # noise and rid need no model


def test_rid_weights_lists_the_networks_folder_after_a_fixed_no_network_entry():
    weights = spec.CLOAK.input("rid_weights")
    assert weights.type == "COMBO" and weights.optional
    assert weights.options_from == spec.RID_NETWORKS and spec.RID_FOLDER == "iddm_rid"
    # always listed, so the shipped graphs hold a value every server accepts; it says where networks go
    assert weights.options == (spec.NO_RID_NETWORK,) and weights.default == spec.NO_RID_NETWORK
    assert "models/iddm_rid" in spec.NO_RID_NETWORK
    assert spec.CLOAK.inputs[-1] is weights  # graphs saved before it existed keep their widget values
    assert "rid_weights" in spec.CLOAK.input("method").tooltip and "models/iddm_rid" in spec.CLOAK.description


@pytest.mark.parametrize("choice", [None, "", spec.NO_RID_NETWORK])
def test_rid_without_a_network_is_refused_naming_the_folder_inside_models(choice):
    with pytest.raises(ConfigError) as refused:
        convert.rid_network_name("rid", choice)
    message = str(refused.value)
    assert "models/iddm_rid" in message and "rid_weights" in message
    assert not re.search(r"(^|[\s(])(/|~|[A-Za-z]:\\)", message)  # no absolute path: it stays in /history


def test_only_rid_reads_the_network_choice():
    assert convert.rid_network_name("rid", "mine.safetensors") == "mine.safetensors"
    assert convert.rid_network_name("noise", spec.NO_RID_NETWORK) is None
    assert convert.rid_network_name("aspl", None) is None


def test_rid_report_names_no_network_file(tmp_path):
    path = random_rid_network(tmp_path / "anna_rid_network.safetensors", eta=0.08)
    config = cloak_config(resolution=64)
    outcome = run_cloak(make_cloak(CloakRequest("rid", config, rid_weights=path)), torch.rand(2, 3, 64, 64))
    text = convert.cloak_report("rid", config, outcome)
    report = json.loads(text)
    assert report["method"] == "rid" and 0 < report["figures"]["linf"] <= report["budget_0_1"] + 1e-5
    assert report["figures"]["trained_eta_0_1"] == pytest.approx(0.04)
    assert "anna" not in text and str(tmp_path) not in text and "safetensors" not in text


def test_cloak_report_holds_settings_and_figures_only():
    config = cloak_config(resolution=64)
    photos = torch.rand(2, 3, 64, 64)
    for method in ("none", "noise"):
        report = json.loads(convert.cloak_report(method, config, run_cloak(make_cloak(CloakRequest(method, config)), photos)))
        assert report["method"] == method and report["photos"] == 2
        assert report["budget_0_1"] == pytest.approx(0.025)
        assert set(report["figures"]) == {"linf", "psnr", "ssim"}
        assert set(report["settings"]) == set(METHOD_KNOBS[method])  # only what the method reads
    assert report["settings"]["eta"] == CLOAK_DEFAULTS["eta"] and report["figures"]["psnr"] > 30
    assert set(METHOD_KNOBS) == set(METHODS) and all(set(k) <= set(CLOAK_KNOBS) for k in METHOD_KNOBS.values())
    aspl = json.loads(convert.cloak_report("aspl", config, run_cloak(make_cloak(CloakRequest("none", config)), photos)))
    assert aspl["settings"]["iterations"] == CLOAK_DEFAULTS["iterations"] and set(aspl["settings"]) == set(CLOAK_KNOBS)
    unchanged = json.loads(convert.cloak_report("none", config, run_cloak(make_cloak(CloakRequest("none", config)), photos)))
    assert unchanged["figures"]["psnr"] is None  # valid JSON: no Infinity
