"""Autoguidance and the guidance interval: the arithmetic, the interval's edges, guides that
cannot guide, a model folder naming its guide, and the CLI."""

import json
from pathlib import Path

import pytest
import torch

from birdgen.model_folder import ModelError, build_model, load_model, save_model
from birdgen.cli import main
from birdgen.diffusion import DiffusionConfig
from birdgen.guidance import SPECIES_WEIGHT, GuidanceError, GuidanceRecord, parse_interval, resolve_guidance
from birdgen.networks import preset
from birdgen.pipeline import GenerationRequest, generate

from test_species import SPECIES, species_model


def random_model(folder, channels=(8, 16), prediction="v", num_steps=100, image_size=16, seed=0, guidance=None,
                 species=None):
    model = build_model(preset("small", channels=channels, image_size=image_size,
                               num_classes=len(species) if species else 0),
                        DiffusionConfig(num_steps=num_steps, prediction=prediction))
    with torch.no_grad():  # away from the zero-initialised output layer, so that outputs differ
        torch.manual_seed(seed)
        for parameter in model.network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    save_model(folder, model.network, model.network_config, model.diffusion_config, guidance=guidance,
               species=species)
    return folder


@pytest.fixture
def pair(tmp_path):
    """A main model whose config names a smaller guide, w 2, interval [40, 60]."""
    random_model(tmp_path / "guide", channels=(8, 8), seed=1)
    random_model(tmp_path / "main", guidance={"guide": "../guide", "guide_weight": 2.0, "interval": [40, 60]})
    return tmp_path


def outputs(model, x, t):
    steps = torch.full((len(x),), t)
    with torch.no_grad():
        return model.network(x, steps), model.guide.network(x, steps)


def test_weight_one_is_the_main_model_and_zero_the_guide(pair):
    model = load_model(pair / "main")
    x = torch.randn(3, 3, 16, 16)
    main, guide = outputs(model, x, 50)
    assert not torch.allclose(main, guide, atol=1e-3)
    for weight, expected in ((1.0, main), (0.0, guide), (2.5, guide + 2.5 * (main - guide))):
        denoiser = model.denoiser(guidance=model.resolve_guidance(guide_weight=weight))
        assert torch.allclose(denoiser.output(x, 50), expected, atol=1e-5), weight
    ones = model.denoiser(guidance=model.resolve_guidance(guide_weight=1.0))
    ones.output(x, 50)
    assert ones.passes == {"main": 1, "guide": 0}  # w = 1 never runs the guide


def test_the_interval_switches_guidance_on_exactly_inside_it(pair):
    model = load_model(pair / "main")
    x = torch.randn(2, 3, 16, 16)
    denoiser = model.denoiser(guidance=model.resolve_guidance())  # the config's w 2 and [40, 60]
    for t, inside in ((39, False), (40, True), (50, True), (60, True), (61, False)):
        main, guide = outputs(model, x, t)
        expected = guide + 2.0 * (main - guide) if inside else main
        assert torch.allclose(denoiser.output(x, t), expected, atol=1e-5), t
    assert denoiser.passes == {"main": 5, "guide": 3}


def test_the_interval_limits_species_guidance_too(tmp_path):
    model = species_model(tmp_path / "s")
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    denoiser = model.denoiser(labels, model.resolve_guidance(3.0, interval=(40, 60)))
    for t, inside in ((39, False), (45, True), (61, False)):
        steps = torch.full((2,), t)
        with torch.no_grad():
            conditional = model.network(x, steps, labels)
            unconditional = model.network(x, steps, torch.full_like(labels, 3))
        expected = unconditional + 3 * (conditional - unconditional) if inside else conditional
        assert torch.allclose(denoiser.output(x, t), expected, atol=1e-5), t


def test_a_config_names_its_guide_and_none_turns_it_off(pair):
    model = load_model(pair / "main")
    assert model.guide is not None and model.guide.name == "guide"
    assert Path(model.guide.path) == pair / "guide"  # "main/../guide" is named by where it is
    assert model.resolve_guidance().guide_weight == 2.0 and model.resolve_guidance().interval == (40, 60)
    assert load_model(pair / "main", guide="none").guide is None
    request = GenerationRequest("ddim", 4, 2, seed=3)
    guided = generate(model, request)
    assert guided.passes == {"main": 4, "guide": 1}  # DDIM 4 on 100 steps visits 99, 74, 49, 24: one inside
    alone = generate(load_model(pair / "main", guide="none"), request)
    same = generate(model, GenerationRequest("ddim", 4, 2, seed=3, guide_weight=1.0))
    assert torch.equal(alone.images, same.images) and not torch.allclose(alone.images, guided.images, atol=1e-4)
    everywhere = generate(model, GenerationRequest("ddim", 4, 2, seed=3, interval=(0, 99)))
    assert everywhere.passes == {"main": 4, "guide": 4}
    assert "of its guide guide" in guided.cost_text(model) and "× the unguided cost" in guided.cost_text(model)


@pytest.mark.parametrize("change, message", [
    ({"num_steps": 200}, "noise schedule"),
    ({"prediction": "epsilon"}, "it predicts epsilon, main predicts v"),
    ({"image_size": 32}, "its image size is 32, not 16"),
    ({"species": SPECIES[:2]}, "it is a species model and the main model is not"),
])
def test_a_guide_that_cannot_guide_is_refused_in_one_line(tmp_path, change, message):
    random_model(tmp_path / "guide", channels=(8, 8), **change)
    random_model(tmp_path / "main", guidance={"guide": "../guide", "guide_weight": 2.0})
    with pytest.raises(ModelError, match=message) as caught:
        load_model(tmp_path / "main")
    assert "cannot guide main" in str(caught.value) and "\n" not in str(caught.value)


def test_species_guides_must_know_the_same_species(tmp_path):
    random_model(tmp_path / "guide", channels=(8, 8), species=SPECIES[:2])
    random_model(tmp_path / "main", species=[SPECIES[0], SPECIES[2]])
    with pytest.raises(ModelError, match="it knows other species"):
        load_model(tmp_path / "main", guide=str(tmp_path / "guide"))
    random_model(tmp_path / "good", channels=(8, 8), species=[SPECIES[0], SPECIES[2]])
    assert load_model(tmp_path / "main", guide=str(tmp_path / "good")).guide.species == [SPECIES[0], SPECIES[2]]


def test_bad_guidance_settings_fail_in_one_line(tmp_path):
    assert resolve_guidance(None, False, 100).guide_weight == 1.0
    with pytest.raises(GuidanceError, match="needs a guide model"):
        resolve_guidance(None, False, 100, guide_weight=2.0)
    with pytest.raises(GuidanceError, match="guide weight 9.0 out of range"):
        resolve_guidance(None, True, 100, guide_weight=9.0)
    with pytest.raises(GuidanceError, match=r"need 0 ≤ low ≤ high < 100"):
        parse_interval("50,100", 100)
    assert parse_interval("all", 100) == (0, 99) and resolve_guidance(None, True, 100, interval=(0, 99)).interval is None
    with pytest.raises(GuidanceError, match="unknown setting"):
        GuidanceRecord.from_dict({"guide": "g", "wieght": 2}, 100)
    random_model(tmp_path / "m", guidance={"guide_weight": "strong"})
    with pytest.raises(ModelError, match="config.json: 'guidance': guide_weight must be a number"):
        load_model(tmp_path / "m")


def test_the_cli_uses_the_guide_by_default_and_can_turn_it_off(pair, capsys):
    out = pair / "grid.png"
    assert main(["sample", "--model", str(pair / "main"), "--sampler", "ddim", "--steps", "4", "--num", "2",
                 "--out", str(out)]) == 0
    assert "autoguidance by guide, w 2, t 40–60" in capsys.readouterr().out
    assert main(["sample", "--model", str(pair / "main"), "--guide", "none", "--sampler", "ddim", "--steps", "4",
                 "--num", "2", "--out", str(out)]) == 0
    assert "autoguidance" not in capsys.readouterr().out
    assert main(["sample", "--model", str(pair / "guide"), "--guide", str(pair / "main"), "--sampler", "ddim",
                 "--steps", "4", "--num", "2", "--guide-interval", "all", "--out", str(out)]) == 0
    assert "(autoguidance by main, w 2)" in capsys.readouterr().out  # "all": no interval
    assert main(["sample", "--model", str(pair / "main"), "--guide-weight", "7", "--out", str(out)]) == 2
    assert "guide weight 7.0 out of range [0, 5]" in capsys.readouterr().err


def test_set_guide_replaces_the_link_and_keeps_the_species_weight(pair, capsys):
    config = pair / "main" / "config.json"
    raw = json.loads(config.read_text())
    raw["guidance"]["species_weight"] = 5.0
    config.write_text(json.dumps(raw))
    assert main(["set-guide", "--model", str(pair / "main"), "--guide", str(pair / "guide"),
                 "--guide-weight", "1.5"]) == 0
    assert json.loads(config.read_text())["guidance"] == {"species_weight": 5.0, "guide": "../guide",
                                                          "guide_weight": 1.5}
    assert "w = 1.5 at every step" in (pair / "main" / "README.md").read_text()
    assert main(["set-guide", "--model", str(pair / "main"), "--guide", "none"]) == 0
    assert json.loads(config.read_text())["guidance"] == {"species_weight": 5.0}
    assert load_model(pair / "main").guide is None


def test_export_writes_and_keeps_the_guide_link(pair, tmp_path):
    from birdgen.export import guidance_record_for_export

    assert guidance_record_for_export(pair / "main", None, None, None) == {
        "guide": "../guide", "guide_weight": 2.0, "species_weight": SPECIES_WEIGHT, "interval": [40, 60]}
    new = guidance_record_for_export(tmp_path / "fresh", str(pair / "guide"), 2.5, (200, 999))
    assert new["guide"] == "../guide" and new["guide_weight"] == 2.5 and new["interval"] == [200, 999]
    assert json.loads((pair / "main" / "config.json").read_text())["guidance"]["guide"] == "../guide"
