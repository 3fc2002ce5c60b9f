"""kohya key mapping, IDDM metadata (every knob, no identifying data), atomic save/load."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_iddm.atomic import OutputExistsError
from comfyui_iddm.config import IDDMConfig
from comfyui_iddm.lora_io import (LoRAError, kaiming_uniform_down, kohya_name, load_lora, lora_metadata,
                                  match_lora, read_iddm_settings, save_lora)

PATHS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
         "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
NAMES = [kohya_name(p) for p in PATHS]
SHAPES = {name: (torch.Size([2, 8]), torch.Size([8, 2])) for name in NAMES}
CONFIG = IDDMConfig(rho=0.1, rank=2, lora_alpha=3.0, recognizers=("mobilefacenet", "dlib_resnet"),
                    stage2_timesteps=(0, 150), instance_prompt="a photo of sks person")


def kohya_state(alpha: float = 3.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name in NAMES:
        state[name + ".lora_down.weight"] = torch.randn(2, 8, generator=gen)
        state[name + ".lora_up.weight"] = torch.randn(8, 2, generator=gen)
        state[name + ".alpha"] = torch.tensor(alpha)
    return state


def test_kohya_names_and_a_matching_state_round_trip():
    assert NAMES == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                     "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]
    matched = match_lora(kohya_state(), SHAPES, lora_alpha=3.0)
    state = kohya_state()
    for name in NAMES:
        assert torch.equal(matched[name][0], state[name + ".lora_down.weight"])
        assert torch.equal(matched[name][1], state[name + ".lora_up.weight"])


def test_kohya_alpha_is_folded_into_lora_up_when_it_differs():
    matched = match_lora(kohya_state(alpha=6.0), SHAPES, lora_alpha=3.0)
    assert torch.allclose(matched[NAMES[0]][1], kohya_state()[NAMES[0] + ".lora_up.weight"] * 2)


@pytest.mark.parametrize("break_state, message", [
    (lambda s: s.pop(NAMES[1] + ".lora_up.weight"), "lacks .lora_up.weight"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith(NAMES[1])], "1 missing module"),
    (lambda s: s.__setitem__("lora_unet_other_to_q.lora_down.weight", torch.zeros(2, 8)), "1 unknown module"),
    (lambda s: s.__setitem__(NAMES[0] + ".lora_down.weight", torch.zeros(4, 8)), "set rank to the file's rank"),
])
def test_a_state_of_another_model_is_a_lora_error_that_says_what_is_wrong(break_state, message):
    state = kohya_state()
    break_state(state)
    with pytest.raises(LoRAError, match=message):
        match_lora(state, SHAPES, lora_alpha=3.0)


def test_the_one_lora_initialisation_is_kohyas_kaiming_uniform():
    down = kaiming_uniform_down(64, 400, torch.Generator().manual_seed(0))
    bound = 1 / 400 ** 0.5
    assert down.shape == (64, 400) and down.abs().max() <= bound
    # uniform on [-b, b]: mean 0, variance b^2 / 3
    assert abs(float(down.mean())) < 0.02 * bound and abs(float(down.var()) / (bound ** 2 / 3) - 1) < 0.03
    assert torch.equal(down, kaiming_uniform_down(64, 400, torch.Generator().manual_seed(0)))


def test_metadata_has_every_knob_and_nothing_else():
    meta = lora_metadata(CONFIG, {"seconds_total": 12.5, "decoupled": {"psnr": 33.1, "linf": 0.08}},
                         base_model_version="sd_v1")
    knobs = {f"iddm.{f.name}" for f in dataclasses.fields(IDDMConfig)}
    assert set(meta) == knobs | {"iddm.version", "iddm.figures", "ss_network_dim", "ss_network_alpha",
                                 "ss_network_module", "ss_base_model_version"}
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 3.0
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["iddm.figures"])["decoupled"]["psnr"] == 33.1
    assert "ss_base_model_version" not in lora_metadata(CONFIG, {})


def test_metadata_refuses_anything_but_numbers_in_figures():
    with pytest.raises(ValueError, match="only aggregate numbers"):
        lora_metadata(CONFIG, {"photos": ["IMG_0001.jpg"]})
    with pytest.raises(ValueError, match=r"figures\.per_photo\.name"):
        lora_metadata(CONFIG, {"per_photo": {"name": "/home/me/me.png"}})


def test_settings_read_back_into_the_same_config(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, kohya_state(), lora_metadata(CONFIG, {"ism": 0.4}))
    state, meta = load_lora(path)
    settings = read_iddm_settings(meta)
    assert settings["version"] and settings["figures"] == {"ism": 0.4}
    knobs = {k: v for k, v in settings.items() if k not in ("version", "figures")}
    assert IDDMConfig.from_dict(knobs) == CONFIG
    assert all(torch.equal(state[k], v) for k, v in kohya_state().items())
    assert read_iddm_settings({"ss_network_dim": "4"}) is None
    assert read_iddm_settings(None) is None
    with pytest.raises(ValueError, match="iddm.rho"):
        read_iddm_settings({**meta, "iddm.rho": "0.1.2"})


def test_save_refuses_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "lora.safetensors"
    state = kohya_state()
    save_lora(path, state, {})
    with pytest.raises(OutputExistsError, match="overwrit"):
        save_lora(path, state, {"x": "1"})
    assert load_lora(path)[1] == {}
    save_lora(path, state, {"x": "1"}, overwrite=True)
    assert load_lora(path)[1] == {"x": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temp files left


def test_load_refuses_files_that_are_not_loras(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.weight": torch.zeros(2)}, str(checkpoint))
    with pytest.raises(ValueError, match=r"model\.safetensors holds no LoRA weights"):
        load_lora(checkpoint)
    text = tmp_path / "fake.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(ValueError, match=r"fake\.safetensors is not a readable \.safetensors"):
        load_lora(text)
    with pytest.raises(FileNotFoundError):
        load_lora(tmp_path / "absent.safetensors")


def test_iddm_made_loras_are_told_apart_by_their_header_alone(tmp_path):
    from safetensors.torch import save_file

    from comfyui_iddm.lora_io import iddm_lora_names, lora_metadata, save_lora

    state = {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)}
    (tmp_path / "sub").mkdir()
    save_lora(tmp_path / "sub" / "ours.safetensors", state, lora_metadata(IDDMConfig(), {}))
    save_file(state, str(tmp_path / "stock.safetensors"), metadata={"ss_network_dim": "4"})
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "old.pt").write_bytes(b"\x80\x04")  # never opened: not safetensors
    names = ["sub/ours.safetensors", "stock.safetensors", "broken.safetensors", "old.pt", "missing.safetensors"]
    assert iddm_lora_names(tmp_path, names) == {"sub/ours.safetensors"}
