"""Class-conditional models and classifier-free guidance: the network, training with label
dropout, init-from, guided sampling on an exact two-class denoiser, species lookup, CLI."""

import json

import pytest
import torch

from birdgen.data import CropSettings, SplitSettings
from birdgen.model_folder import ModelError, build_model, load_model, save_model
from birdgen.cli import main
from birdgen.diffusion import DiffusionConfig, NoiseSchedule
from birdgen.export import export_with_card
from birdgen.networks import UNet, frozen_parameters, preset
from birdgen.pipeline import GenerationRequest, generate
from birdgen.samplers import Denoiser, initial_noise, make_sampler, run_to_end
from birdgen.species import SpeciesError, readable, resolve_species
from birdgen.loop import draw_batch
from birdgen.run_config import TrainConfig, resolve
from birdgen.run_folder import BatchStream, TrainingError
from birdgen.train import train

from test_training import config, weights

SPECIES = [[17, "017.Cardinal"], [47, "047.American_Goldfinch"], [48, "048.European_Goldfinch"]]


def species_model(folder, num_classes=3, prediction="v"):
    model = build_model(preset("small", channels=(8, 16), image_size=16, num_classes=num_classes),
                        DiffusionConfig(num_steps=100, prediction=prediction))
    with torch.no_grad():  # weights away from their zero starts, so that species and guidance matter
        torch.manual_seed(0)
        for parameter in model.network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        model.network.class_embedding.weight.normal_()
    save_model(folder, model.network, model.network_config, model.diffusion_config, species=SPECIES[:num_classes])
    return load_model(folder)


def test_an_unconditional_network_is_unchanged_and_a_new_class_embedding_starts_at_zero():
    plain = UNet(preset("small", channels=(8, 16), image_size=16))
    assert not any("class_embedding" in k for k in plain.state_dict())
    conditional = UNet(preset("small", channels=(8, 16), image_size=16, num_classes=3))
    conditional.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 50])
    with torch.no_grad():
        plain.out.weight.normal_()
        conditional.out.weight.copy_(plain.out.weight)
        assert torch.equal(conditional(x, t, torch.tensor([0, 2])), plain(x, t))
        assert torch.equal(conditional(x, t), conditional(x, t, torch.tensor([3, 3])))  # None = "no species"


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_guidance_one_is_the_conditional_and_zero_the_unconditional_prediction(tmp_path, prediction):
    model = species_model(tmp_path / "m", prediction=prediction)
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    null = torch.full_like(labels, 3)
    steps = torch.full((4,), 40)
    with torch.no_grad():
        conditional = model.network(x, steps, labels)
        unconditional = model.network(x, steps, null)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)
    for w, expected in ((1.0, conditional), (0.0, unconditional), (3.0, unconditional + 3 * (conditional - unconditional))):
        out = Denoiser(model.network, model.schedule, labels=labels, guidance=w).output(x, 40)
        assert torch.allclose(out, expected, atol=1e-5), w


class TwoPointDenoiser(torch.nn.Module):
    """The exact epsilon-prediction for data that is one of two constant images, -0.6 (class 0)
    or +0.6 (class 1), each with probability 1/2: conditional on the class it is a point mass;
    without a class the posterior weighs both by their likelihood at x_t."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.alpha_bar = schedule.alpha_bar64
        self.null_class = 2

    def forward(self, x, t, labels=None):
        ab = self.alpha_bar[t.cpu()].float().view(-1, 1, 1, 1)
        points = torch.tensor([-0.6, 0.6]).view(1, 2, 1, 1, 1)
        residual = x[:, None] - ab.sqrt()[:, None] * points  # (N, 2, C, H, W)
        log_likelihood = -(residual ** 2).flatten(2).sum(2) / (2 * (1 - ab.view(-1, 1)))
        weights = torch.softmax(log_likelihood, dim=1)
        if labels is not None:
            chosen = torch.nn.functional.one_hot(labels.clamp(max=1), 2).float()
            weights = torch.where((labels < 2)[:, None], chosen, weights)
        x0 = (weights.view(-1, 2, 1, 1, 1) * points).sum(1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp"])
def test_guided_samples_land_on_the_requested_class(sampler):
    schedule = NoiseSchedule(DiffusionConfig(num_steps=100, prediction="epsilon"))
    network = TwoPointDenoiser(schedule)
    noise, generator = initial_noise(64, 4, seed=0, channels=1)
    for label, sign in ((1, 1), (0, -1)):
        labels = torch.full((64,), label)
        for w in (1.0, 3.0):
            images = run_to_end(make_sampler(sampler, schedule, 25), Denoiser(network, schedule, labels=labels,
                                                                               guidance=w), noise, generator)
            assert ((images.mean(dim=(1, 2, 3)) * sign) > 0.5).all(), (sampler, label, w)
    free = run_to_end(make_sampler(sampler, schedule, 25), Denoiser(network, schedule, labels=torch.zeros(64, dtype=torch.long),
                                                                    guidance=0.0), noise, generator)
    share = (free.mean(dim=(1, 2, 3)) > 0).float().mean()
    assert 0.25 < share < 0.75  # w = 0: both classes, as in the data


def test_label_dropout_drops_the_requested_share():
    images = torch.zeros(1000, 4, 4, 3, dtype=torch.uint8)
    labels = torch.arange(1000) % 7
    stream = BatchStream(1000, 1000, seed=0)
    order = stream.order.clone()  # drawing the whole epoch moves the stream on to the next one
    _, _, _, y = draw_batch(images, stream, torch.Generator().manual_seed(0), 100, channels_last=False,
                            labels=labels, label_dropout=0.25, null_class=7)
    dropped = (y == 7).float().mean().item()
    assert 0.21 < dropped < 0.29
    kept = y != 7
    assert torch.equal(y[kept], labels[order][kept])


def test_conditional_training_resumes_exactly_and_starts_from_an_unconditional_model(tiny_cub, tmp_path):
    base = dict(conditional=True, label_dropout=0.3)
    train(config(tiny_cub, steps=4), tmp_path / "plain")
    export_with_card(tmp_path / "plain", tmp_path / "plain-model", half=False)
    start = dict(base, init_from=str(tmp_path / "plain-model"), channels=None)  # the network comes with it
    train(config(tiny_cub, steps=4, **start), tmp_path / "straight")
    train(config(tiny_cub, steps=2, **start), tmp_path / "halves")
    train(config(tiny_cub, steps=4, **start), tmp_path / "halves", resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a = weights(tmp_path / "straight" / "checkpoints" / "step-0000004" / name)
        b = weights(tmp_path / "halves" / "checkpoints" / "step-0000004" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    model = load_model(export_with_card(tmp_path / "straight", tmp_path / "species-model"))
    assert model.conditional and [name for _, name in model.species] == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    card = (tmp_path / "species-model" / "README.md").read_text()
    assert "Bird 1" in card and "--conditional" in card

    # a zero class embedding: the first step starts from exactly the unconditional network
    fresh = TrainConfig(**{**config(tiny_cub).__dict__, **start})
    with pytest.raises(TrainingError, match="brings its own network; drop channels"):
        train(TrainConfig(**{**fresh.__dict__, "channels": (8, 24)}), tmp_path / "other")
    with pytest.raises(TrainingError, match="this run sets prediction 'v' \\(it has 'epsilon'\\)"):
        train(TrainConfig(**{**fresh.__dict__, "prediction": "v"}), tmp_path / "other")
    with pytest.raises(TrainingError, match="nothing/config.json: missing model config"):
        resolve({**fresh.__dict__, "init_from": str(tmp_path / "nothing")})


def test_species_lookup_and_errors(tmp_path):
    model = species_model(tmp_path / "m")
    assert readable("047.American_Goldfinch") == "American Goldfinch"
    assert resolve_species(model, "17") == 0 and resolve_species(model, "CARDINAL") == 0
    assert resolve_species(model, "american goldfinch") == 1 and resolve_species(model, "European") == 2
    with pytest.raises(SpeciesError, match="matches several: American Goldfinch, European Goldfinch"):
        resolve_species(model, "goldfinch")
    with pytest.raises(SpeciesError, match="did you mean 'Cardinal'"):
        resolve_species(model, "cardinall")
    with pytest.raises(SpeciesError, match="species id 99 is not one of the 3"):
        resolve_species(model, "99")
    plain = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100))
    with pytest.raises(SpeciesError, match="is not a species model"):
        generate(plain, GenerationRequest("ddim", 2, 1, species=(0,)))
    with pytest.raises(ValueError, match="guidance 20.0 out of range"):
        generate(model, GenerationRequest("ddim", 2, 1, species=(0,), guidance=20.0))
    config_path = tmp_path / "m" / "config.json"
    raw = json.loads(config_path.read_text())
    raw["species"] = raw["species"][:2]
    config_path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="each of the network's 3 classes"):
        load_model(tmp_path / "m")


def test_species_commands(tmp_path, capsys):
    species_model(tmp_path / "m")
    assert main(["species", "--model", str(tmp_path / "m")]) == 0
    assert "47  American Goldfinch" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "m"), "--species", "Cardinal", "--species", "47", "--guidance",
                 "3", "--num", "3", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(out).size == (3 * 18 + 2, 2 * 18 + 2)  # one row per species
    assert main(["sample", "--model", str(tmp_path / "m"), "--species", "all", "--num", "2", "--steps", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (2 * 18 + 2, 3 * 18 + 2)
    assert main(["sample", "--model", str(tmp_path / "m"), "--species", "Robin", "--steps", "2", "--out", str(out)]) == 2
    assert "unknown species 'Robin'" in capsys.readouterr().err
    plain = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100))
    save_model(tmp_path / "plain", plain.network, plain.network_config, plain.diffusion_config)
    assert main(["sample", "--model", str(tmp_path / "plain"), "--species", "17", "--out", str(out)]) == 2
    assert "is not a species model" in capsys.readouterr().err
    assert main(["species", "--model", str(tmp_path / "plain")]) == 2


def test_class_weights_mix_species_and_one_hot_weights_equal_the_class(tmp_path):
    model = species_model(tmp_path / "m")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([30, 30])
    with torch.no_grad():
        hard = model.network(x, t, torch.tensor([1, 3]))
        soft = model.network(x, t, torch.nn.functional.one_hot(torch.tensor([1, 3]), 4).float())
    assert torch.allclose(hard, soft, atol=1e-5)
    soft_out = Denoiser(model.network, model.schedule, labels=torch.eye(4)[[1, 2]], guidance=3.0).output(x, 30)
    hard_out = Denoiser(model.network, model.schedule, labels=torch.tensor([1, 2]), guidance=3.0).output(x, 30)
    assert torch.allclose(soft_out, hard_out, atol=1e-5)


def test_species_interpolation_and_species_edits(tmp_path):
    from birdgen.editing import EditError, EditRequest, interpolation_steps, sdedit_steps

    model = species_model(tmp_path / "m")
    frames = list(interpolation_steps(model, 5, 5, frames=4, steps=4, species=(0, 2), guidance=2.0))[-1].x
    for frame, species in ((frames[0], 0), (frames[-1], 2)):
        own = generate(model, GenerationRequest("ddim", 4, 1, 5, species=(species,), guidance=2.0)).images[0]
        assert torch.allclose(frame, own, atol=1e-4)
    assert not torch.allclose(frames[1], frames[0], atol=1e-3)
    picture = torch.zeros(1, 3, 16, 16)
    plain = list(sdedit_steps(model, picture, EditRequest(steps=4, strength=0.8, num_images=2)))[-1].x
    turned = list(sdedit_steps(model, picture, EditRequest(steps=4, strength=0.8, num_images=2, species=1)))[-1].x
    assert not torch.allclose(plain, turned, atol=1e-3)
    with pytest.raises(EditError, match="guidance 16.0 out of range"):
        list(sdedit_steps(model, picture, EditRequest(species=1, guidance=16.0)))
    unconditional = build_model(preset("small", channels=(8, 16), image_size=16), DiffusionConfig(num_steps=100))
    with pytest.raises(SpeciesError, match="is not a species model"):
        list(interpolation_steps(unconditional, 1, 2, 3, 2, species=(0, 1)))


def test_a_species_model_is_evaluated_on_the_species_of_the_real_crops(tiny_cub, tmp_path):
    from birdgen.data import load_crops, split_record
    from birdgen.evaluation import EvalSettings, evaluate
    from birdgen.export import update_card_quality
    from birdgen.evaluation import write_metrics
    from test_evaluation import ColourStatistics

    crops = load_crops(tiny_cub, CropSettings(size=16), progress=False)
    model = build_model(preset("small", channels=(8, 16), image_size=16, num_classes=3), DiffusionConfig(num_steps=50))
    save_model(tmp_path / "m", model.network, model.network_config, model.diffusion_config, card="# m\n",
               species=[[c, crops.class_names[c]] for c in (1, 2, 3)],
               data=split_record(crops, SplitSettings("random", 0, 0.3, "train")))
    model = load_model(tmp_path / "m")
    with pytest.warns(UserWarning):
        evaluation = evaluate(model, crops, EvalSettings(num_samples=10, steps=2, batch_size=4, guidance=2.0),
                              ColourStatistics(), "colour", "test-space")
    assert evaluation.metrics["species"] == "those of the real crops, in turn" and evaluation.metrics["guidance"] == 2.0
    write_metrics(model, evaluation)
    update_card_quality(model.path)
    assert "follow the species of the real crops in turn, with guidance 2" in (model.path / "README.md").read_text()


@pytest.mark.parametrize("part", ["outer", "convolutions"])
def test_a_frozen_part_keeps_its_base_weights_and_the_rest_learns(tiny_cub, tmp_path, part):
    train(config(tiny_cub, steps=2), tmp_path / "plain")
    export_with_card(tmp_path / "plain", tmp_path / "plain-model", half=False)
    start = dict(conditional=True, init_from=str(tmp_path / "plain-model"), channels=None, freeze=part, lr=1e-2)
    train(config(tiny_cub, steps=3, **start), tmp_path / "frozen")
    before = weights(tmp_path / "plain-model" / "model.safetensors")
    after = weights(tmp_path / "frozen" / "checkpoints" / "step-0000003" / "model.safetensors")
    network = UNet(load_model(tmp_path / "plain-model").network_config)
    names = {id(p): name for name, p in network.named_parameters()}
    frozen = {names[id(p)] for p in frozen_parameters(network, part)}
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    learnt = [name for name in before if name not in frozen and not torch.equal(before[name], after[name])]
    assert learnt
    export_with_card(tmp_path / "frozen", tmp_path / "frozen-model", half=False)
    card = (tmp_path / "frozen-model" / "README.md").read_text()
    assert f"{part} frozen" in card and f"--freeze {part}" in card


def test_freeze_is_checked_before_a_run_starts(tiny_cub, tmp_path):
    with pytest.raises(TrainingError, match="freeze 'all': choose one of none, outer, convolutions"):
        TrainConfig(data=str(tiny_cub), freeze="all").check()
    with pytest.raises(TrainingError, match="freeze 'outer' holds trained weights fixed; it needs init_from"):
        TrainConfig(data=str(tiny_cub), freeze="outer").check()


def test_a_high_noise_share_moves_that_share_of_timesteps_to_the_noisier_half():
    images = torch.zeros(4000, 4, 4, 3, dtype=torch.uint8)

    def timesteps(share):
        stream = BatchStream(4000, 4000, seed=0)
        return draw_batch(images, stream, torch.Generator().manual_seed(0), 1000, channels_last=False,
                          high_noise_share=share)[1]

    assert 0.47 < (timesteps(0.0) >= 500).float().mean() < 0.53
    assert 0.72 < (timesteps(0.5) >= 500).float().mean() < 0.78  # half redrawn up there, plus the other half's half
    assert bool((timesteps(1.0) >= 500).all()) and timesteps(1.0).max() < 1000
    with pytest.raises(TrainingError, match="high_noise_share 1.5 out of range \\[0, 1\\]"):
        TrainConfig(data="x", high_noise_share=1.5).check()
