"""APDM (apdm.py, apdm_weights.py, `iddm immunize`): the DPO loss's sign and convergence where the naive
loss diverges, L2P on the tiny model (the person's denoising loss rises, others' barely moves), the
files it writes (a LoRA for the stock loader or a UNet checkpoint; settings and figures only), and bad
input refused before anything is written."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from comfyui_iddm.apdm import APDMConfig, ProtectedWeights, dpo_objective, run_apdm
from comfyui_iddm.apdm_weights import Protection, apply_protection, load_protection, save_protection
from comfyui_iddm.backends.diffusers_backend import load_denoiser
from comfyui_iddm.backends.tiny import pretrain
from comfyui_iddm.config import ConfigError

from conftest import files_under, run_cli_here, synthetic_photos, write_photos

SUBJECT_NAMES = ["maria_garden.png", "maria_office.png", "maria_beach.png"]


# --- the loss on a toy ---------------------------------------------------------------------------
def test_dpo_pushes_the_person_up_and_others_down_and_starts_at_log_2():
    e_pos, e_neg = torch.full((4,), 0.5, requires_grad=True), torch.full((4,), 0.5, requires_grad=True)
    reference = torch.full((4,), 0.5)
    loss = dpo_objective(e_pos, reference, e_neg, reference, beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # model == reference
    assert (e_neg.grad < 0).all()  # descending the loss raises the error on the person...
    assert (e_pos.grad > 0).all()  # ...and lowers it on someone else


def toy_descent(loss_of, steps: int = 300, lr: float = 0.05) -> tuple[torch.Tensor, list[float], list[float]]:
    """Gradient descent on a 2-d 'model' w whose squared errors on the person (n) and on someone else
    (p) are its distances to them; the reference model is w0. Returns (w, losses, gradient norms)."""
    n, p, w0 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])
    w, losses, norms = w0.clone().requires_grad_(True), [], []
    for _ in range(steps):
        e_neg, e_pos = ((w - n) ** 2).sum(), ((w - p) ** 2).sum()
        loss = loss_of(e_pos, ((w0 - p) ** 2).sum(), e_neg, ((w0 - n) ** 2).sum())
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad
        losses.append(loss.item())
        norms.append(float(grad.norm()))
    return w.detach(), losses, norms


def test_dpo_converges_where_the_naive_loss_runs_away():
    w_dpo, dpo, dpo_grads = toy_descent(lambda ep, rp, en, rn: dpo_objective(ep, rp, en, rn, beta=1.0))
    w_naive, naive, naive_grads = toy_descent(lambda ep, rp, en, rn: -en)
    assert dpo[-1] < 0.05 * dpo[0] and min(dpo) >= 0  # bounded below by 0, and reaching it
    assert dpo_grads[-1] < 0.05 * dpo_grads[0]  # flattening: the model comes to rest
    assert w_dpo.norm() < 5
    assert naive[-1] < -1e6 and w_naive.norm() > 1e3  # no minimum: every step pushes further
    assert naive_grads[-1] > 100 * naive_grads[0]  # and harder


# --- L2P on the tiny model -----------------------------------------------------------------------
def mean_loss(denoiser, images, prompt, seed=0, draws=6):
    from comfyui_iddm.losses import draw_noise, reconstruction_loss

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0, cond = denoiser.encode(images), denoiser.encode_prompt([prompt])
        return sum(float(reconstruction_loss(denoiser, z0, cond, draw_noise(denoiser, z0.shape, generator)))
                   for _ in range(draws)) / draws


@pytest.fixture(scope="module")
def faces():
    """The person (one synthetic portrait, mirrored and shifted) and eight other people, 64 px."""
    one = synthetic_photos(1, 64, seed=5)
    return torch.cat([one, one.flip(-1), one.roll(2, -1), one.roll(-2, -2)]), synthetic_photos(8, 64, seed=1)


@pytest.fixture(scope="module")
def pretrained(faces):
    """The tiny base after learning to denoise all these faces: a model with something to lose."""
    subject, others = faces
    denoiser = load_denoiser("tiny", APDMConfig(resolution=64).fine_tune_config())
    pretrain(denoiser, torch.cat([subject, others]), steps=100)
    return {name: p.detach().clone() for name, p in denoiser.unet_parameters().items()}


def pretrained_tiny(config, weights):
    denoiser = load_denoiser("tiny", config.fine_tune_config())
    apply_protection(denoiser, Protection("unet", weights, None))
    return denoiser


def test_dpo_raises_the_persons_loss_where_the_naive_loss_raises_everyones(faces, pretrained):
    subject, others = faces
    rise = {}
    for loss in ("dpo", "naive"):
        config = APDMConfig(iterations=12, ft_steps=3, resolution=64, batch_size=2, lr=5e-5, protect_loss=loss)
        denoiser = pretrained_tiny(config, pretrained)
        before = {"subject": mean_loss(denoiser, subject, config.instance_prompt),
                  "others": mean_loss(denoiser, others[4:], config.class_prompt)}  # never in APDM's training
        events = []
        result = run_apdm(denoiser, subject, config, class_images=others[:4], on_progress=events.append)
        rise[loss] = {k: mean_loss(denoiser, images, prompt) / before[k] - 1 for k, images, prompt in (
            ("subject", subject, config.instance_prompt), ("others", others[4:], config.class_prompt))}
        f = result.figures
        assert f["subject_loss_protected"] > f["subject_loss_base"]
        assert [e.phase for e in events[:4]] == ["personalize", "protect"] * 2 and events[-1].done == 72
    assert rise["dpo"]["subject"] > 0.001, rise
    assert abs(rise["dpo"]["others"]) < rise["dpo"]["subject"] / 2, rise  # others barely move
    assert rise["naive"]["others"] > 3 * abs(rise["dpo"]["others"]), rise  # the naive loss damages everyone


def test_the_reference_is_the_base_model_and_the_weights_come_back(faces):
    subject, _ = faces
    denoiser = load_denoiser("tiny", APDMConfig(resolution=64).fine_tune_config())
    weights = ProtectedWeights.of(denoiser, "unet")
    base_loss = mean_loss(denoiser, subject, "a photo of sks person")
    with torch.no_grad():
        for p in weights.parameters:
            p.mul_(0.9)
    changed = mean_loss(denoiser, subject, "a photo of sks person")
    with weights.as_reference():
        assert mean_loss(denoiser, subject, "a photo of sks person") == pytest.approx(base_loss)
    assert mean_loss(denoiser, subject, "a photo of sks person") == pytest.approx(changed)
    assert changed != pytest.approx(base_loss)


# --- the files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["lora", "unet"])
def test_saved_protection_applies_to_a_fresh_base_model(faces, tmp_path, form):
    subject, others = faces
    config = APDMConfig(iterations=1, ft_steps=2, resolution=64, protect_weights=form, lr=1e-3)
    denoiser = load_denoiser("tiny", config.fine_tune_config())
    result = run_apdm(denoiser, subject, config, class_images=others)
    protected_loss = mean_loss(denoiser, subject, config.instance_prompt)
    path = tmp_path / "protected.safetensors"
    save_protection(path, result, config)
    fresh = load_denoiser("tiny", config.fine_tune_config())
    protection = load_protection(path)
    assert protection.form == form and protection.settings["protect_weights"] == form
    apply_protection(fresh, protection)
    assert mean_loss(fresh, subject, config.instance_prompt) == pytest.approx(protected_loss, rel=1e-5)
    if form == "lora":  # folded into the base: the LoRA an attacker trains starts fresh on top
        assert all(float(v.abs().max()) == 0 for k, v in fresh.lora_state_dict().items() if "lora_up" in k)


def test_immunize_writes_settings_and_figures_never_the_person(tmp_path):
    subject, classes = tmp_path / "private", tmp_path / "others"
    write_photos(subject, 3, names=SUBJECT_NAMES)
    write_photos(classes, 3, seed=7)
    out = tmp_path / "models" / "protected.safetensors"
    out.parent.mkdir()
    code, stdout, stderr = run_cli_here([
        "immunize", "--base", "tiny", "--subject", str(subject), "--out", str(out), "--class-dir", str(classes),
        "--detector", "none", "--resolution", "64", "--iterations", "1", "--ft-steps", "1",
        "--protect-weights", "lora", "--threads", "1"])
    assert code == 0, stderr
    assert files_under(out.parent) == {"protected.safetensors"}
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    assert meta["apdm.protect_weights"] == "lora" and meta["ss_network_module"] == "networks.lora"
    figures = json.loads(meta["apdm.figures"])
    assert set(figures) == {"subject_loss_base", "subject_loss_protected", "others_loss_base", "others_loss_protected"}
    header = json.dumps(meta) + stdout + stderr
    for name in SUBJECT_NAMES:
        assert name not in header and name.split(".")[0] not in header
    assert str(subject) not in header and str(classes) not in json.dumps(meta)
    assert "LoraLoader" in stdout and "the person's photos" in stdout


@pytest.mark.parametrize("extra, message", [
    ([], "needs class images"),  # DPO without images of other people
    (["--class-dir", "CLASSES", "--protect-loss", "best"], "protect_loss='best' is not one of dpo, naive"),
    (["--class-dir", "CLASSES", "--dpo-beta", "0"], "dpo_beta=0.0 is out of range"),
    (["--class-dir", "CLASSES", "--protect-weights", "full"], "protect_weights='full' is not one of unet, lora"),
    (["--class-dir", "CLASSES", "--protect-loss", "naive", "--prior-weight", "0"], "prior_weight is 0"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, extra, message):
    subject, classes = tmp_path / "private", tmp_path / "others"
    write_photos(subject, 2)
    write_photos(classes, 2, seed=3)
    out = tmp_path / "out" / "protected.safetensors"
    out.parent.mkdir()
    argv = ["immunize", "--base", "tiny", "--subject", str(subject), "--out", str(out), "--detector", "none",
            "--resolution", "64", "--iterations", "1", "--ft-steps", "1"]
    argv += [str(classes) if a == "CLASSES" else a for a in extra]
    code, _, stderr = run_cli_here(argv)
    assert code == 2 and message in stderr, stderr
    assert files_under(out.parent) == set()


def test_unet_form_needs_float32_weights():
    denoiser = load_denoiser("tiny", APDMConfig(resolution=64, mixed_precision="bf16").fine_tune_config())
    with pytest.raises(ConfigError, match="mixed_precision no"):
        ProtectedWeights.of(denoiser, "unet")


def test_out_must_be_safetensors_and_free(tmp_path):
    subject, classes = tmp_path / "private", tmp_path / "others"
    write_photos(subject, 2)
    write_photos(classes, 2, seed=3)
    common = ["immunize", "--base", "tiny", "--subject", str(subject), "--class-dir", str(classes),
              "--detector", "none", "--resolution", "64", "--iterations", "1", "--ft-steps", "1"]
    code, _, stderr = run_cli_here([*common, "--out", str(tmp_path / "protected.ckpt")])
    assert code == 2 and ".safetensors" in stderr
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    code, _, stderr = run_cli_here([*common, "--out", str(taken)])
    assert code == 2 and "--overwrite" in stderr and taken.read_bytes() == b"keep me"


def test_an_interrupted_immunize_continues_with_resume(tmp_path, monkeypatch):
    """The CLI keeps finished iterations beside --out: without --resume a leftover run is refused
    (never silently lost), with it the run continues; once written, nothing is left behind."""
    import comfyui_iddm.apdm_weights as apdm_weights

    subject, classes = tmp_path / "private", tmp_path / "others"
    write_photos(subject, 2)
    write_photos(classes, 2, seed=3)
    out = tmp_path / "out" / "protected.safetensors"
    out.parent.mkdir()
    argv = ["immunize", "--base", "tiny", "--subject", str(subject), "--class-dir", str(classes), "--out", str(out),
            "--detector", "none", "--resolution", "64", "--iterations", "2", "--ft-steps", "1",
            "--protect-weights", "lora", "--threads", "1"]
    code, _, stderr = run_cli_here([*argv, "--resume"])
    assert code == 2 and "nothing saved" in stderr and files_under(out.parent) == set()

    save = apdm_weights.save_protection
    monkeypatch.setattr(apdm_weights, "save_protection", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, stderr = run_cli_here(argv)
    assert code == 130 and "--resume" in stderr and not out.exists()
    state = out.parent / ".protected.safetensors.iddm-state"
    assert state.is_dir()
    monkeypatch.setattr(apdm_weights, "save_protection", save)

    code, _, stderr = run_cli_here(argv)
    assert code == 2 and "--resume" in stderr and not out.exists()
    code, stdout, stderr = run_cli_here([*argv, "--resume"])
    assert code == 0, stderr
    assert files_under(out.parent) == {"protected.safetensors"}


# --- the model-side evaluation -------------------------------------------------------------------
def test_evaluate_protection_attacks_the_protected_model_on_clean_photos(tmp_path, test_recognizer):
    subject, others, person, generic = (tmp_path / name for name in ("private", "others", "person", "generic"))
    write_photos(subject, 4, names=[*SUBJECT_NAMES, "maria_home.png"])
    write_photos(others, 3, seed=7)
    write_photos(person, 2, seed=9)
    write_photos(generic, 2, seed=11)
    model = tmp_path / "protected.safetensors"
    fast = ["--detector", "none", "--resolution", "64", "--threads", "1"]
    code, _, stderr = run_cli_here(["immunize", "--base", "tiny", "--subject", str(subject), "--out", str(model),
                                    "--class-dir", str(others), "--iterations", "1", "--ft-steps", "1", *fast])
    assert code == 0, stderr
    code, stdout, stderr = run_cli_here([
        "evaluate-protection", "--clean", str(subject), "--base", "tiny", "--protected-model", str(model),
        "--other-people", str(others), "--generic", str(generic), "--different-person", str(person),
        "--attacker-transform", "jpeg:75,resize:0.5", "--attack-steps", "2", "--recognizers", test_recognizer,
        "--json", *fast])
    assert code == 0, stderr
    summary = json.loads(stdout)
    row = summary["rows"][-1]
    assert [r["method"] for r in summary["rows"]] == ["no attack (base model)", "none", "model 1: APDM dpo (unet)"]
    assert summary["attacker_transform"] == "resize 0.5 + JPEG q75"
    utility = row["utility"]
    assert set(utility) == {"before_attack", "other_people", "generic", "different_person"}
    for name in ("other_people", "generic"):
        assert utility[name]["change"] == pytest.approx(utility[name]["protected"] / utility[name]["base"] - 1, abs=1e-3)
    assert set(utility["different_person"]["protected"]["x0_cosine"]) == {test_recognizer}
    text = stdout + stderr
    assert "maria" not in text and str(model) not in text and "protected.safetensors" not in text


def test_other_checks_need_a_protected_model(tmp_path, test_recognizer):
    write_photos(tmp_path / "p", 4)
    code, _, stderr = run_cli_here(["evaluate-protection", "--clean", str(tmp_path / "p"), "--base", "tiny",
                                    "--generic", str(tmp_path / "p"), "--detector", "none", "--resolution", "64",
                                    "--recognizers", test_recognizer])
    assert code == 2 and "--protected-model" in stderr


def test_attacker_transform_shrinks_compresses_and_keeps_the_size():
    from comfyui_iddm.photo_transforms import PhotoTransform

    photos = synthetic_photos(2, 64)
    transform = PhotoTransform.parse("jpeg:75,resize:0.5")
    out = transform.apply(photos)
    assert out.shape == photos.shape and 0 < float((out - photos).abs().mean()) < 0.1
    assert PhotoTransform.parse("none").apply(photos) is photos
    for bad in ("jpeg:0", "jpeg:75.5", "resize:1", "blur:2", "jpeg:75,jpeg:50", "jpeg"):
        with pytest.raises(ConfigError):
            PhotoTransform.parse(bad)


def test_a_cancelled_run_resumes_to_the_same_protection(faces, tmp_path):
    from comfyui_iddm.iddm import Cancelled
    from comfyui_iddm.run_state import StateMismatchError

    subject, others = faces
    config = APDMConfig(iterations=2, ft_steps=2, resolution=64, protect_weights="lora", lr=1e-3)

    def run(state_dir=None, should_cancel=None, photos=subject):
        denoiser = load_denoiser("tiny", config.fine_tune_config())
        return run_apdm(denoiser, photos, config, class_images=others, state_dir=state_dir,
                        should_cancel=should_cancel)
    whole = run()
    state = tmp_path / "state"
    steps = iter(range(100))
    with pytest.raises(Cancelled):
        run(state, should_cancel=lambda: next(steps) == 5)  # in the second iteration
    with pytest.raises(StateMismatchError, match="other photos"):
        run(state, photos=others[:4])
    resumed = run(state)
    assert resumed.weights.keys() == whole.weights.keys()
    for key, value in whole.weights.items():
        assert torch.equal(resumed.weights[key], value), key
    assert len(resumed.iterations) == 2
