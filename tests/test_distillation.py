import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from birdgen.model_folder import build_model, load_model, save_model
from birdgen.cli import main
from birdgen.data import CropSettings, SplitSettings, load_crops, split_record
from birdgen.diffusion import DiffusionConfig, NoiseSchedule
from birdgen.distillation import ProgressiveDistillationLoss, distill
from birdgen.export import export_student, export_student_with_card
from birdgen.run_config import DistillConfig
from birdgen.modelcard import GRID_SEED
from birdgen.editing import final_steps
from birdgen.networks import preset
from birdgen.pipeline import GenerationRequest, generate, model_sampling
from birdgen.records import SamplingRecord
from birdgen.samplers import DDIMSampler, Denoiser, initial_noise, run_to_end
from birdgen.images import grid_image
from birdgen.run_folder import TrainingError

TINY = preset("small", image_size=16, channels=(8, 16))
DIFFUSION = DiffusionConfig(schedule="cosine", num_steps=100, prediction="v")


def make_teacher(folder, data_root, **extra):
    torch.manual_seed(0)
    model = build_model(TINY, DIFFUSION)
    crops = load_crops(data_root, CropSettings(size=16), progress=False)
    record = split_record(crops, SplitSettings("official", 0, 0.2, "train"))
    return save_model(folder, model.network, TINY, DIFFUSION, data=record, **extra)


def settings(teacher, data, **overrides) -> DistillConfig:
    values = dict(teacher=str(teacher), data=str(data), teacher_steps=8, steps_target=2, round_steps=3, batch_size=4,
                  checkpoint_every=2, sample_every=3, sample_count=2, log_every=1, progress=False, num_threads=1)
    return DistillConfig(**{**values, **overrides})


def test_target_makes_one_student_step_land_on_two_teacher_steps():
    torch.manual_seed(0)
    model = build_model(TINY, DIFFUSION)
    schedule = NoiseSchedule(DIFFUSION)
    loss = ProgressiveDistillationLoss(schedule, student_steps=4)
    teacher_sampler = DDIMSampler(schedule, 8)
    z = torch.randn(3, 3, 16, 16)
    for j in range(4):  # every student grid point, the last one ending on clean images
        two_steps = list(final_steps(teacher_sampler, 8 - 2 * j).steps(Denoiser(model.network, schedule), z))[1].x
        target = loss.target(model.network, z, torch.full((3,), j))
        student_sampler = final_steps(DDIMSampler(schedule, 4, clip_x0=False), 4 - j)
        t = student_sampler.timesteps[0]
        alpha_bar = float(schedule.alpha_bar64[t])

        def denoise(x, _t, target=target, alpha_bar=alpha_bar):  # a student whose x_0 is exactly the target
            return target, (x - alpha_bar ** 0.5 * target) / (1 - alpha_bar) ** 0.5

        one_step = next(iter(student_sampler.steps(denoise, z))).x
        assert torch.allclose(one_step, two_steps, atol=1e-4), j


def test_a_distillation_step_reduces_the_loss_against_the_two_step_target():
    torch.manual_seed(0)
    teacher = build_model(TINY, DIFFUSION).network.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    loss_fn = ProgressiveDistillationLoss(NoiseSchedule(DIFFUSION), student_steps=2)
    x0, noise = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randn(8, 3, 16, 16)
    index = torch.arange(8) % 2
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    before = loss_fn(student, teacher, x0, noise, index).item()
    assert before > 0  # a copy of the teacher does not yet do in one step what it does in two
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(student, teacher, x0, noise, index).backward()
        optimizer.step()
    assert loss_fn(student, teacher, x0, noise, index).item() < 0.75 * before


def randomised(model, seed: int):
    """A model whose output is not the untrained network's zero (its last layer starts at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("interval", [None, (30, 99)])
def test_guided_targets_land_on_two_steps_of_the_autoguided_sampler(interval):
    """With a guide, the teacher's two steps are those of the app's autoguided DDIM (the Denoiser
    with the same guide, weight and interval), so the student learns the guided sampler."""
    model, guide = randomised(build_model(TINY, DIFFUSION), 0), randomised(build_model(TINY, DIFFUSION), 1)
    schedule = NoiseSchedule(DIFFUSION)
    loss = ProgressiveDistillationLoss(schedule, 4, guide=guide.network, guide_weight=2.5, interval=interval)
    plain = ProgressiveDistillationLoss(schedule, 4)
    guided_denoiser = Denoiser(model.network, schedule, guide=guide.network, guide_weight=2.5, interval=interval)
    z = torch.randn(3, 3, 16, 16)
    for j in range(4):
        index = torch.full((3,), j)
        two_steps = list(final_steps(DDIMSampler(schedule, 8), 8 - 2 * j).steps(guided_denoiser, z))[1].x
        points = 2 * index
        z_end = loss._teacher_step(model.network, loss._teacher_step(model.network, z, points), points + 1)
        assert torch.allclose(z_end, two_steps, atol=1e-4), j
    assert not torch.allclose(loss.target(model.network, z, torch.zeros(3, dtype=torch.long)),
                              plain.target(model.network, z, torch.zeros(3, dtype=torch.long)))


def test_guided_distillation_records_its_guide_in_the_student(tiny_cub, tmp_path):
    teacher = make_teacher(tmp_path / "teacher", tiny_cub)
    guide = randomised(build_model(TINY, DIFFUSION), 1)
    save_model(tmp_path / "guide", guide.network, TINY, DIFFUSION, data=load_model(teacher).data)
    guided = settings(teacher, tiny_cub, steps_target=4, guide=str(tmp_path / "guide"), guide_weight=2.0)
    distill(guided, tmp_path / "guided")
    distill(settings(teacher, tiny_cub, steps_target=4), tmp_path / "plain")
    student = load_model(export_student_with_card(tmp_path / "guided", tmp_path / "student"))
    assert student.distillation.guide == str(tmp_path / "guide") and student.distillation.guide_weight == 2.0
    assert "| guided teacher |" in (tmp_path / "student" / "README.md").read_text()
    a, b = (load_file(str(tmp_path / run / "students" / "ddim-4.safetensors")) for run in ("guided", "plain"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the guide changed what the student learned
    with pytest.raises(TrainingError, match="guide_weight 9.0 out of range"):
        distill(settings(teacher, tiny_cub, guide_weight=9.0), tmp_path / "bad")


class StopAfter:
    """StopRequests that turns true at the loop's check before step `steps`, as a Ctrl-C would."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self):
        from birdgen.run_folder import StopRequests

        limit = self.steps

        class Stop(StopRequests):
            checks = 0

            def __bool__(self):
                Stop.checks += 1
                return Stop.checks > limit

        return Stop()


def test_resume_across_a_round_is_exact_and_every_round_is_kept(tiny_cub, tmp_path, monkeypatch):
    teacher = make_teacher(tmp_path / "teacher", tiny_cub)
    distill(settings(teacher, tiny_cub), tmp_path / "straight")
    assert sorted(p.name for p in (tmp_path / "straight" / "students").iterdir()) == ["ddim-2.safetensors",
                                                                                      "ddim-4.safetensors"]
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:  # interrupted after 5 of 6 steps, inside the second round
        patch.setattr("birdgen.distillation.StopRequests", StopAfter(5))
        distill(settings(teacher, tiny_cub), resumed)
    state = torch.load(sorted((resumed / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    assert (state["step"], state["round"], state["reason"]) == (5, 1, "signal")
    distill(settings(teacher, tiny_cub), resumed, resume=True)
    for name in ("model.safetensors", "teacher.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000006" / name))
        b = load_file(str(resumed / "checkpoints" / "step-0000006" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    logged = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_student_folder_round_trips_with_its_sampler(tiny_cub, tmp_path):
    teacher = make_teacher(tmp_path / "teacher", tiny_cub)
    run = tmp_path / "run"
    distill(settings(teacher, tiny_cub), run)
    for steps in (4, 2):
        student = load_model(export_student(run, tmp_path / f"student{steps}", steps))
        assert student.sampling == SamplingRecord("ddim", steps)
        assert student.distillation.teacher == str(teacher) and student.distillation.rounds == {4: 1, 2: 2}[steps]
        assert student.data == load_model(teacher).data
        assert model_sampling(student) == ("ddim", steps)
        assert generate(student, GenerationRequest(num_images=2)).steps == steps
        for wrong in (GenerationRequest("ddim", 50, 2), GenerationRequest("dpmpp", None, 2),
                      GenerationRequest(None, None, 2, eta=0.5)):
            with pytest.raises(ValueError, match=f"distilled for {steps} ddim steps only"):
                generate(student, wrong)
    assert model_sampling(load_model(teacher)) == ("dpmpp", 10)
    with pytest.raises(TrainingError, match="distils to 4, 2 steps, not 3"):
        export_student(run, tmp_path / "x", 3)


def test_export_refuses_an_unfinished_round(tiny_cub, tmp_path):
    teacher = make_teacher(tmp_path / "teacher", tiny_cub)
    run = tmp_path / "run"
    distill(settings(teacher, tiny_cub, round_steps=4, checkpoint_every=1), run)
    (run / "students" / "ddim-2.safetensors").unlink()
    with pytest.raises(TrainingError, match=r"round 2 \(2 steps\) has not finished"):
        export_student(run, tmp_path / "student")


@pytest.mark.parametrize("overrides, message", [
    (dict(teacher_steps=32, steps_target=3), "must divide teacher_steps 32 by a power of two"),
    (dict(teacher_steps=24, steps_target=4), "must divide teacher_steps 24 by a power of two"),
    (dict(teacher_steps=4, steps_target=4), "must divide teacher_steps 4 by a power of two"),
    (dict(teacher="no-such-folder"), "teacher: no-such-folder: no such model folder"),
    (dict(round_steps=0), "round_steps must be at least 1"),
])
def test_bad_arguments_fail_in_one_line(tiny_cub, tmp_path, overrides, message):
    teacher = overrides.pop("teacher", None) or make_teacher(tmp_path / "teacher", tiny_cub)
    with pytest.raises(TrainingError, match=message):
        distill(settings(teacher, tiny_cub, **overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_student_teaches_only_at_its_own_steps_and_species_models_are_refused(tiny_cub, tmp_path):
    student = make_teacher(tmp_path / "student", tiny_cub, sampling={"sampler": "ddim", "steps": 4})
    with pytest.raises(TrainingError, match="distilled for 4 ddim steps can only teach at that count"):
        distill(settings(student, tiny_cub, teacher_steps=8), tmp_path / "run")
    distill(settings(student, tiny_cub, teacher_steps=4, steps_target=2, round_steps=1), tmp_path / "further")
    assert (tmp_path / "further" / "students" / "ddim-2.safetensors").is_file()

    torch.manual_seed(0)
    conditional = preset("small", image_size=16, channels=(8, 16), num_classes=3)
    species = build_model(conditional, DIFFUSION)
    save_model(tmp_path / "species", species.network, conditional, DIFFUSION,
               species=[[1, "001.A"], [2, "002.B"], [3, "003.C"]])
    with pytest.raises(TrainingError, match="a species model; distilling classifier-free guidance is not supported"):
        distill(settings(tmp_path / "species", tiny_cub), tmp_path / "run2")


def test_cli_distill_export_and_sample(tiny_cub, tmp_path, capsys):
    teacher = make_teacher(tmp_path / "teacher", tiny_cub)
    run, out = tmp_path / "run", tmp_path / "student"
    assert main(["distill", "--out", str(run), "--teacher", str(teacher), "--data", str(tiny_cub), "--teacher-steps",
                 "4", "--steps-target", "2", "--round-steps", "2", "--batch-size", "4", "--sample-count", "2",
                 "--log-every", "1", "--no-progress", "--num-threads", "1"]) == 0
    assert main(["export", str(run), "--to", str(out), "--raw-weights"]) == 2
    assert "--raw-weights applies to training runs, not to a distillation run" in capsys.readouterr().err
    assert main(["export", str(run), "--to", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "2 deterministic DDIM steps" in card and "progressive distillation" in card
    assert {"samples.png", "comparison.png", "loss.png"} <= {p.name for p in out.iterdir()}
    assert main(["sample", "--model", str(out), "--num", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert "2 ddim steps" in capsys.readouterr().out
    assert main(["sample", "--model", str(out), "--steps", "50", "--num", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert "distilled for 2 ddim steps only" in capsys.readouterr().err


def test_a_student_of_a_student_names_the_root_teacher(tiny_cub, tmp_path):
    teacher = make_teacher(tmp_path / "teacher", tiny_cub)
    distill(settings(teacher, tiny_cub, teacher_steps=8, steps_target=4, round_steps=2), tmp_path / "first")
    middle = export_student(tmp_path / "first", tmp_path / "student4")
    distill(settings(middle, tiny_cub, teacher_steps=4, steps_target=2, round_steps=2), tmp_path / "second")
    final = load_model(export_student_with_card(tmp_path / "second", tmp_path / "student2"))
    record = final.distillation
    assert record.teacher == str(teacher) and record.distilled_teacher == str(middle)
    assert record.earlier.teacher_steps == 8 and record.images_seen_total == 2 * 2 * 4
    card = (tmp_path / "student2" / "README.md").read_text()
    assert "| earlier stage |" in card and "| guided teacher |" not in card
    # the same-noise picture's teacher rows are the root teacher's, which can sample at DDIM 50
    root = load_model(teacher)
    noise, _ = initial_noise(64, 16, GRID_SEED)
    rows = [run_to_end(DDIMSampler(root.schedule, n), root.denoiser(), noise[:8]) for n in (50, 2)]
    student_row = run_to_end(DDIMSampler(final.schedule, 2), final.denoiser(), noise[:8])
    expected = np.asarray(grid_image(torch.cat([*rows, student_row]), 8, padding=2))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "student2" / "comparison.png").convert("RGB")), expected)
    assert f"rows: the teacher `{teacher}` with DDIM 50" in card


def test_a_student_of_a_guided_student_says_where_the_guide_ran(tiny_cub, tmp_path):
    teacher = make_teacher(tmp_path / "teacher", tiny_cub)
    guide = randomised(build_model(TINY, DIFFUSION), 1)
    save_model(tmp_path / "guide", guide.network, TINY, DIFFUSION, data=load_model(teacher).data)
    distill(settings(teacher, tiny_cub, steps_target=4, round_steps=2, guide=str(tmp_path / "guide"),
                     guide_weight=2.0), tmp_path / "first")
    middle = export_student(tmp_path / "first", tmp_path / "student4")
    distill(settings(middle, tiny_cub, teacher_steps=4, steps_target=2, round_steps=2), tmp_path / "second")
    final = load_model(export_student_with_card(tmp_path / "second", tmp_path / "student2"))
    assert final.distillation.guide is None and final.distillation.earlier.guide == str(tmp_path / "guide")
    card = (tmp_path / "student2" / "README.md").read_text()
    assert f"| guided teacher | the earlier stage's first round's targets are `{teacher}` autoguided by" in card
