"""RID (issue 14): the cloaking network, Adv-SDS and the weight files (ours and the authors' layout).
CPU, tiny models built in code, no downloads."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors import safe_open

from comfyui_iddm import rid_weights
from comfyui_iddm.backends.tiny import tiny_scheduler
from comfyui_iddm.config import ConfigError
from comfyui_iddm.diffusion import NoiseSchedule
from comfyui_iddm.faces.weights import WeightFormatError
from comfyui_iddm.losses import NoiseDraw
from comfyui_iddm.rid import (ARCHITECTURES, RIDArchitecture, RIDNet, RIDSettings, adv_sds, cloak_photos,
                              ensemble_adv_sds, rid_cloak, sincos_positions, train_rid)
from comfyui_iddm.rid_weights import (check_published_layout, from_published, load_rid, published_layout,
                                      rid_metadata, save_rid, saved_budget)

from conftest import synthetic_photos

TOY = RIDArchitecture(patch_size=8, hidden_size=32, depth=2, num_heads=2)


def randomised(net: RIDNet, seed: int = 0, std: float = 1.0) -> RIDNet:
    """Every weight random (the trained-from-zero output layer too), so outputs are far from zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return net


# --- the network -------------------------------------------------------------------------------------
def test_the_perturbation_never_leaves_the_budget_at_any_size():
    budget = 0.03
    net = randomised(RIDNet(TOY, budget), std=3.0)  # saturates tanh nearly everywhere
    for shape in ((2, 3, 64, 64), (1, 3, 72, 40), (1, 3, 30, 33)):  # also not multiples of the patch
        photos = torch.rand(shape)
        delta = net(photos)
        assert delta.shape == photos.shape
        assert delta.abs().max() <= budget + 1e-7
        assert delta.abs().max() > 0.9 * budget  # the bound is reached, not just respected
        cloaked = cloak_photos(net, photos)
        assert cloaked.min() >= 0 and cloaked.max() <= 1
        assert (cloaked - photos).abs().max() <= budget + 1e-6


def test_a_new_network_starts_from_no_perturbation():
    photos = torch.rand(2, 3, 64, 64)
    assert torch.equal(RIDSettings(resolution=64).build_net()(photos), torch.zeros_like(photos))


def test_the_position_code_is_a_sin_cos_table_row_major_columns_first():
    table = sincos_positions(8, rows=2, cols=3)
    assert table.shape == (6, 8)
    # position (row 1, col 2) is index 5: sin/cos of the column at frequencies 1 and 1/100, then the row
    expected = torch.tensor([torch.sin(torch.tensor(2.0)), torch.sin(torch.tensor(0.02)),
                             torch.cos(torch.tensor(2.0)), torch.cos(torch.tensor(0.02)),
                             torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01)),
                             torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01))])
    assert torch.allclose(table[5], expected, atol=1e-6)


# --- Adv-SDS ---------------------------------------------------------------------------------------
class PointMassModel:
    """A diffusion model whose data is one latent `mu`: its exact noise estimate at (z_t, t) is
    (z_t - sqrt(a) mu) / sqrt(1 - a). Pixel space: encode(x) = 2x - 1 (as tiny's codec, unshuffled)."""

    def __init__(self, mu: torch.Tensor, prediction_type: str = "epsilon") -> None:
        self.mu, self.device = mu, torch.device("cpu")
        self.schedule = NoiseSchedule(tiny_scheduler().alphas_cumprod.float(), prediction_type)

    def encode_prompt(self, prompts):
        return torch.zeros(1, 1, 1)

    def encode(self, images):
        return images * 2 - 1

    def predict(self, z_t, t, cond):
        a, s = self.schedule.coefficients(t, z_t)
        noise = (z_t - a * self.mu) / s
        return noise if self.schedule.prediction_type == "epsilon" else a * noise - s * self.mu


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_adv_sds_gradient_is_the_negated_sds_direction_away_from_the_data(prediction_type):
    generator = torch.Generator().manual_seed(0)
    mu, z0 = torch.randn(1, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8, generator=generator)
    model = PointMassModel(mu, prediction_type)
    draw = NoiseDraw(torch.randn(2, 3, 8, 8, generator=generator), torch.tensor([100, 600]))
    leaf = z0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(adv_sds(model, leaf, model.encode_prompt([""]), draw).surrogate, leaf)
    # For this model eps_hat - eps = sqrt(a)(z0 - mu)/sqrt(1-a); Adv-SDS's gradient w.r.t. z0 is
    # -w(t) sqrt(a) (eps_hat - eps) / numel with w = 1 - a: it points towards mu, so descent leaves it.
    a, s = model.schedule.coefficients(draw.t, z0)
    expected = -(s ** 2) * a * (a * (z0 - mu) / s) / z0.numel()
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-9)
    stepped = z0 - 1e3 * grad
    assert ((stepped - mu).flatten(1).norm(dim=1) > (z0 - mu).flatten(1).norm(dim=1)).all()


def test_the_ensemble_averages_the_models_adv_sds():
    generator = torch.Generator().manual_seed(1)
    models = [PointMassModel(torch.randn(1, 3, 16, 16, generator=generator)) for _ in range(2)]
    conds = [m.encode_prompt([""]) for m in models]
    photos = torch.rand(2, 3, 16, 16, generator=generator).requires_grad_(True)
    (together,) = torch.autograd.grad(
        ensemble_adv_sds(models, conds, photos, torch.Generator().manual_seed(5), (0, 999)).surrogate, photos)
    replay, alone = torch.Generator().manual_seed(5), []
    for model, cond in zip(models, conds):  # the same draws, in the same order
        t = torch.randint(0, 1000, (2,), generator=replay)  # losses.draw_noise: timesteps, then noise
        draw = NoiseDraw(torch.randn(2, 3, 16, 16, generator=replay), t)
        alone.append(torch.autograd.grad(adv_sds(model, model.encode(photos), cond, draw).surrogate, photos)[0])
    assert torch.allclose(together, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-10)


def test_training_on_adv_sds_pushes_cloaked_faces_away_from_what_the_model_knows():
    faces = synthetic_photos(6, size=64)
    model = PointMassModel(faces.mean(0, keepdim=True) * 2 - 1)  # the model "knows" the average face
    settings = RIDSettings(resolution=64, steps=30, batch_size=3, lr=1e-3, timesteps=(0, 300))
    training = train_rid(faces, [model], settings)
    cloaked = cloak_photos(training.net, faces)
    mu = model.mu
    before = (model.encode(faces) - mu).flatten(1).norm(dim=1)
    after = (model.encode(cloaked) - mu).flatten(1).norm(dim=1)
    assert (after > before).all()
    assert training.history[-1].denoising_error > training.history[0].denoising_error
    assert (cloaked - faces).abs().max() <= settings.budget + 1e-6


def test_the_regulariser_pulls_the_perturbation_towards_the_pairs():
    faces = synthetic_photos(4, size=64)
    target_delta = torch.full_like(faces, 0.02) * torch.sign(torch.randn(1, 3, 1, 1, generator=torch.Generator().manual_seed(3)))
    targets = (faces + target_delta).clamp(0, 1)
    model = PointMassModel(torch.zeros(1, 3, 64, 64))
    settings = RIDSettings(resolution=64, steps=40, batch_size=4, lr=2e-3, reg_weight=1e4)
    training = train_rid(faces, [model], settings, targets=targets)
    assert training.history[-1].regulariser < 0.5 * training.history[0].regulariser
    error = (cloak_photos(training.net, faces) - targets).abs().mean()
    assert error < (faces - targets).abs().mean()


# --- weight files ------------------------------------------------------------------------------------
def published_state() -> dict[str, torch.Tensor]:
    """A state dict in the authors' published layout; torch.empty keeps 338 M parameters cheap."""
    layout = published_layout()
    state = {k: torch.empty(shape) for k, shape in layout.items()}
    state["pos_embed"] = sincos_positions(layout["pos_embed"][2], 32, 32)[None]
    return state


def test_the_published_layout_is_accepted_and_maps_onto_the_network_exactly(tmp_path):
    state = published_state()
    check_published_layout(state, tmp_path / "ASDS-eps-12_255.bin")
    ours = from_published(state)
    with torch.device("meta"):
        net = RIDNet(ARCHITECTURES["published"], 0.02)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert ours["blocks.3.modulation"].data_ptr() == state["blocks.3.adaLN_modulation.1.bias"].data_ptr()
    assert ours["final_modulation"].data_ptr() == state["final_layer.adaLN_modulation.1.bias"].data_ptr()


@pytest.mark.parametrize("change, named", [
    (lambda s: s.pop("blocks.13.mlp.fc2.weight"), "missing: blocks.13.mlp.fc2.weight"),
    (lambda s: s.update({"blocks.14.attn.qkv.weight": torch.empty(1)}), "unexpected: blocks.14.attn.qkv.weight"),
    (lambda s: s.update({"x_embedder.proj.weight": torch.empty(1152, 3, 8, 8)}), "wrong shape: x_embedder.proj.weight"),
    (lambda s: s.update({"pos_embed": torch.zeros(1, 1024, 1152)}), "pos_embed is not"),
])
def test_a_file_in_another_layout_is_refused_naming_what_differs(tmp_path, change, named):
    state = published_state()
    change(state)
    with pytest.raises(WeightFormatError, match=named.replace("(", r"\(")):
        check_published_layout(state, tmp_path / "x.bin")


@pytest.fixture
def toy_published(monkeypatch):
    """The authors' layout at a toy size (same keys, small shapes), so a whole file round trip is cheap."""
    monkeypatch.setattr(rid_weights, "PUBLISHED_ARCH", TOY)
    monkeypatch.setattr(rid_weights, "PUBLISHED_GRID", 4)
    state = {k: torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.05
             for i, (k, shape) in enumerate(published_layout().items())}
    state["pos_embed"] = sincos_positions(TOY.hidden_size, 4, 4)[None]
    return state


def test_the_authors_bin_loads_with_weights_only_and_its_budget_from_the_name(tmp_path, toy_published):
    path = tmp_path / "ASDS-eps-12_255.bin"
    torch.save({f"module.{k}": v for k, v in toy_published.items()}, path)  # DataParallel prefix too
    net = load_rid(path)
    assert net.budget == pytest.approx(12 / 255 / 2)  # their eps is in [-1,1] units
    assert torch.equal(net.blocks[1].modulation, toy_published["blocks.1.adaLN_modulation.1.bias"])
    assert torch.equal(net.patch_embed.weight, toy_published["x_embedder.proj.weight"])
    photos = torch.rand(2, 3, 32, 32)
    assert (rid_cloak(photos, path) - photos).abs().max() <= 12 / 255 / 2 + 1e-6
    assert load_rid(path, eta=0.02).budget == pytest.approx(0.01)  # given eta wins (in [-1,1] units)
    unnamed = tmp_path / "defender.pth"
    unnamed.write_bytes(path.read_bytes())
    with pytest.raises(ConfigError, match="does not record the budget"):
        load_rid(unnamed)
    assert saved_budget(unnamed) is None and saved_budget(path) == pytest.approx(12 / 255 / 2)


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_a_pickle_with_objects_is_refused_before_anything_runs(tmp_path, toy_published, capsys):
    path = tmp_path / "ASDS-eps-12_255.bin"
    torch.save({**toy_published, "extra": Payload()}, path)
    with pytest.raises(WeightFormatError, match="pickled Python objects"):
        load_rid(path)
    assert "would run" not in capsys.readouterr().out
    plain = tmp_path / "net.bin"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightFormatError):
        load_rid(plain, eta=0.05)


def test_our_file_round_trips_with_settings_only_in_its_header(tmp_path):
    settings = RIDSettings(resolution=64, eta=0.04)
    net = randomised(RIDNet(ARCHITECTURES["small"], settings.budget), std=0.05)
    path = tmp_path / "rid.safetensors"
    save_rid(path, net, rid_metadata(settings, ["tiny"], "none"))
    loaded = load_rid(path)
    assert loaded.arch == ARCHITECTURES["small"] and loaded.budget == pytest.approx(0.02)
    photos = torch.rand(1, 3, 64, 64)
    assert torch.allclose(loaded(photos), net(photos).detach(), atol=1e-6)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert header["rid.format"] == rid_weights.FORMAT and header["rid.base_models"] == "tiny"
    assert all(str(tmp_path) not in v for v in header.values())
    with pytest.raises(FileExistsError):
        save_rid(path, net, rid_metadata(settings, ["tiny"], "none"))  # no overwrite unless asked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rid.safetensors"]  # no temp file left


# --- the cloak method ------------------------------------------------------------------------------
def test_the_rid_method_cloaks_at_the_requests_budget_without_a_base_model(tmp_path):
    from comfyui_iddm.cloak import CloakRequest, cloak_config, make_cloak, run_cloak

    settings = RIDSettings(resolution=64, eta=0.08)
    path = tmp_path / "rid.safetensors"
    save_rid(path, randomised(RIDNet(ARCHITECTURES["small"], settings.budget), std=2.0),
             rid_metadata(settings, ["tiny"], "none"))
    photos = synthetic_photos(3, size=64)
    config = cloak_config(eta=0.05, resolution=64)  # the request's budget wins: 0.025 of [0,1]
    outcome = run_cloak(make_cloak(CloakRequest("rid", config, rid_weights=path)), photos)
    assert outcome.cloaked.shape == photos.shape
    assert outcome.figures["linf"] <= config.budget[0] + 1e-5 and outcome.figures["linf"] > 0.02
    assert outcome.figures["trained_eta_0_1"] == pytest.approx(0.04)
    with pytest.raises(ConfigError, match="--rid-weights"):
        make_cloak(CloakRequest("rid", config))
