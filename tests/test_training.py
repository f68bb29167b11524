import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from birdgen.data import CropSettings, load_crops
from birdgen.run_folder import Checkpoints
from birdgen.run_config import TrainConfig
from birdgen.run_folder import TrainingError
from birdgen.train import train
from conftest import REPO

SMALL = dict(image_size=16, channels=(8, 16), batch_size=4, log_every=2, checkpoint_every=3, sample_every=3,
             sample_count=4, sample_steps=3, noise_steps=100, warmup_steps=2, progress=False, num_threads=1)


def config(data, **overrides) -> TrainConfig:
    return TrainConfig(data=str(data), **{**SMALL, **overrides})


def weights(path):
    return load_file(str(path))


def test_short_run_writes_checkpoints_grids_and_logs(tiny_cub, tmp_path):
    run = tmp_path / "run"
    latest = train(config(tiny_cub, steps=7, keep_checkpoints=2), run)
    assert latest.name == "step-0000007"
    assert [p.name for p in Checkpoints(run, 2).complete()] == ["step-0000006", "step-0000007"]
    assert {p.name for p in (run / "samples").iterdir()} == {"step-0000003.png", "step-0000006.png", "latest.png"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "images_per_s", "memory_mb", "images_seen"} <= set(records[0])
    assert json.loads((run / "config.json").read_text())["steps"] == 7
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["step"] == 7 and state["images_seen"] == 28


def test_loss_falls_on_real_data(real_cub, tmp_path):
    crops = load_crops(real_cub, CropSettings(size=16), progress=False)
    cfg = config(real_cub, steps=60, batch_size=16, log_every=10, checkpoint_every=60, sample_every=60,
                 lr=2e-3, noise_steps=1000, num_threads=2)
    train(cfg, tmp_path / "run", crops=crops)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_resume_gives_identical_weights(tiny_cub, tmp_path):
    train(config(tiny_cub, steps=6, dropout=0.1), tmp_path / "straight")
    train(config(tiny_cub, steps=3, dropout=0.1), tmp_path / "halves")
    with open(tmp_path / "halves" / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "loss": 0.4')  # the line a kill tore
    train(config(tiny_cub, steps=6, dropout=0.1), tmp_path / "halves", resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a = weights(tmp_path / "straight" / "checkpoints" / "step-0000006" / name)
        b = weights(tmp_path / "halves" / "checkpoints" / "step-0000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6]


def test_refuses_to_mix_runs(tiny_cub, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_cub, steps=2), run)
    with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
        train(config(tiny_cub, steps=2), run)
    with pytest.raises(TrainingError, match=r"started with other settings \(lr\)"):
        train(config(tiny_cub, steps=4, lr=1e-3), run, resume=True)
    train(config(tiny_cub, steps=2, lr=1e-3), run, overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="not a birdgen run folder"):
        train(config(tiny_cub, steps=2), tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"lr": -1e-4}, "learning rate must be positive"),
    ({"image_size": 18}, "not divisible"),
    ({"schedule": "sigmoid"}, "unknown schedule"),
    ({"precision": "fp8"}, "precision 'fp8'"),
    ({"sample_steps": 500}, "sample_steps 500 exceeds noise_steps 100"),
])
def test_impossible_values_fail_before_work(tiny_cub, tmp_path, overrides, message):
    with pytest.raises(TrainingError, match=message):
        train(config(tiny_cub, steps=2, **overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_config_file_unknown_keys_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.001\nbatch_size: 8\n")
    assert TrainConfig.from_file(tmp_path / "c.yaml").batch_size == 8
    (tmp_path / "bad.json").write_text('{"lr": 0.001, "wingspan": 3}')
    with pytest.raises(TrainingError, match=r"bad\.json: unknown setting\(s\) wingspan"):
        TrainConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "typed.yaml").write_text("batch_size: eight\n")
    with pytest.raises(TrainingError, match=r"typed\.yaml: batch_size must be an integer, not 'eight'"):
        TrainConfig.from_file(tmp_path / "typed.yaml")
    (tmp_path / "broken.yaml").write_text("lr: [")
    with pytest.raises(TrainingError, match=r"broken\.yaml: cannot parse config"):
        TrainConfig.from_file(tmp_path / "broken.yaml")


def nan_losses(monkeypatch, when) -> None:
    """Makes the training loss NaN on the calls (counted from 1) for which when(call) is true."""
    import birdgen.train as loop

    real_call = loop.DiffusionLoss.__call__
    calls = {"n": 0}

    def patched(self, *args):
        calls["n"] += 1
        loss = real_call(self, *args)
        return loss * float("nan") if when(calls["n"]) else loss

    monkeypatch.setattr(loop.DiffusionLoss, "__call__", patched)


def test_non_finite_losses_are_skipped_then_stop(tiny_cub, tmp_path, monkeypatch):
    nan_losses(monkeypatch, lambda call: call in (2, 3))
    latest = train(config(tiny_cub, steps=4), tmp_path / "run")
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in weights(latest / "model.safetensors").values())

    nan_losses(monkeypatch, lambda call: True)
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        train(config(tiny_cub, steps=8, max_nonfinite=3), tmp_path / "run", resume=True)
    assert Checkpoints(tmp_path / "run", 3).latest().name == "step-0000004"


def test_incomplete_checkpoint_is_ignored(tiny_cub, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_cub, steps=3), run)
    # What a kill -9 in the middle of a save leaves behind: a temporary folder, never renamed.
    partial = run / "checkpoints" / ".step-0000006.tmp999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert Checkpoints(run, 3).latest().name == "step-0000003"
    latest = train(config(tiny_cub, steps=6), run, resume=True)
    assert latest.name == "step-0000006" and not partial.exists()


def run_cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "birdgen", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def cli_train_args(data, out, steps):
    return ["train", "--data", str(data), "--out", str(out), "--image-size", "16", "--channels", "8,16",
            "--batch-size", "4", "--noise-steps", "100", "--sample-steps", "3", "--sample-count", "4",
            "--log-every", "1", "--checkpoint-every", "1000", "--sample-every", "1000", "--steps", str(steps),
            "--no-progress", "--num-threads", "1"]


def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny_cub, tmp_path):
    run = tmp_path / "run"
    process = run_cli(*cli_train_args(tiny_cub, run, 100_000))
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file() or \
            len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.2)
        assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Stopped by signal" in err + out
    latest = Checkpoints(run, 3).latest()
    stopped_at = torch.load(latest / "state.pt", weights_only=True)["step"]
    assert stopped_at >= 3
    resumed = run_cli(*cli_train_args(tiny_cub, run, stopped_at + 2), "--resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert Checkpoints(run, 3).latest().name == f"step-{stopped_at + 2:07d}"


def test_cli_rejects_non_cub_folder_and_unknown_config_key(tmp_path):
    process = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "no pictures found" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "c.json").write_text('{"batchsize": 3}')
    process = run_cli("train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "unknown setting(s) batchsize" in err


def test_two_gloo_processes_match_one_process_with_same_global_batch(tiny_cub, tmp_path):
    args = cli_train_args(tiny_cub, tmp_path / "single", 4)
    single = run_cli(*args)
    _, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ddp_args = cli_train_args(tiny_cub, tmp_path / "ddp", 4)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "birdgen", *ddp_args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = weights(tmp_path / "single" / "checkpoints" / "step-0000004" / "model.safetensors")
    b = weights(tmp_path / "ddp" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    moved = sum((a[k] - weights(tmp_path / "single" / "checkpoints" / "step-0000004" / "ema.safetensors")[k])
                .abs().sum() for k in a)
    assert moved > 0
    run_info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run_info["world_size"] == 2


def test_export_writes_a_loadable_model_with_an_honest_card(tiny_cub, tmp_path):
    from birdgen.model_folder import load_model
    from birdgen.cli import main

    run = tmp_path / "run"
    train(config(tiny_cub, steps=4, sample_count=4), run)
    assert main(["export", str(run), "--to", str(tmp_path / "model"), "--heldout-batches", "1"]) == 0
    model = load_model(tmp_path / "model")
    assert model.network_config.channels == (8, 16) and model.diffusion_config.num_steps == 100
    assert model.training.steps == 4 and model.training.images_seen == 16
    card = (tmp_path / "model" / "README.md").read_text()
    assert "4 steps of batch 4 = 16 images seen" in card
    assert "Noise-prediction MSE on 6 held-out crops" in card  # the fixture's official test images
    assert "Not measured" in card and "--channels (8, 16)" not in card
    assert "--channels 8,16" in card and "--no-progress" not in card
    assert (tmp_path / "model" / "samples.png").is_file() and (tmp_path / "model" / "loss.png").is_file()


def test_export_raw_weights_takes_the_optimizers_weights_and_says_so(tiny_cub, tmp_path):
    from birdgen.model_folder import load_model
    from birdgen.cli import main

    run = tmp_path / "run"
    train(config(tiny_cub, steps=4, sample_count=4, checkpoint_every=2), run)
    assert main(["export", str(run), "--to", str(tmp_path / "raw"), "--heldout-batches", "1", "--fp32",
                 "--raw-weights", "--checkpoint-step", "2"]) == 0
    assert main(["export", str(run), "--to", str(tmp_path / "ema"), "--heldout-batches", "1", "--fp32"]) == 0
    checkpoint = run / "checkpoints" / "step-0000002"
    raw = load_model(tmp_path / "raw").network.state_dict()
    assert all(torch.equal(raw[k], v) for k, v in weights(checkpoint / "model.safetensors").items())
    assert not all(torch.equal(raw[k], v) for k, v in weights(checkpoint / "ema.safetensors").items())
    assert load_model(tmp_path / "raw").training.steps == 2
    card = (tmp_path / "raw" / "README.md").read_text()
    assert "| weights | the training weights (no EMA), float32 |" in card
    assert f"`birdgen export {run} --checkpoint-step 2 --raw-weights`" in card
    assert "| weights | EMA, float32 |" in (tmp_path / "ema" / "README.md").read_text()


def test_tensorboard_logging(tiny_cub, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config(tiny_cub, steps=4, log="tensorboard"), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert "images_per_s" in events.Tags()["scalars"]


def test_missing_logging_backend_fails_before_training(tiny_cub, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrainingError, match="pip install wandb"):
        train(config(tiny_cub, steps=2, log="wandb"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_wandb_offline_logging(tiny_cub, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(config(tiny_cub, steps=4, log="wandb"), tmp_path / "run")
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_sync_free_resume_is_exact(tiny_cub, tmp_path):
    train(config(tiny_cub, steps=6, sync_free=True), tmp_path / "straight")
    train(config(tiny_cub, steps=3, sync_free=True), tmp_path / "halves")
    train(config(tiny_cub, steps=6, sync_free=True), tmp_path / "halves", resume=True)
    for name in ("model.safetensors", "ema.safetensors"):
        a = weights(tmp_path / "straight" / "checkpoints" / "step-0000006" / name)
        b = weights(tmp_path / "halves" / "checkpoints" / "step-0000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sync_free_steps_read_nothing_back_between_log_intervals(tiny_cub, tmp_path, monkeypatch):
    """On a GPU every host read of a tensor's value waits for the queue to drain; a sync-free
    step must make none, so they happen only at log intervals and checkpoints."""
    from birdgen.run_folder import StepTallies

    reads = []
    real_loop_read = StepTallies.read
    for name in ("item", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name):
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    marks = []
    monkeypatch.setattr(StepTallies, "read", lambda self: (marks.append(len(reads)), real_loop_read(self))[1])
    steps = 12
    train(config(tiny_cub, steps=steps, sync_free=True, log_every=6, checkpoint_every=100, sample_every=100),
          tmp_path / "run")
    assert len(marks) == 2
    assert marks[0] == 0 and marks[1] == marks[0] + 5  # 5 reads per interval, all inside `read`, none per step

    reads.clear()
    train(config(tiny_cub, steps=steps, sync_free=False, log_every=6, checkpoint_every=100, sample_every=100),
          tmp_path / "synced")
    assert reads.count("__bool__") >= steps  # the per-step path asks the host about every step


def test_sync_free_skips_a_non_finite_step_on_the_device(tiny_cub, tmp_path, monkeypatch):
    """A skipped step leaves weights, EMA and AdamW's moments exactly as they were, with no host check."""
    nan_losses(monkeypatch, lambda call: call == 3)
    run = tmp_path / "run"
    train(config(tiny_cub, steps=2, sync_free=True, checkpoint_every=1, keep_checkpoints=5), run)
    train(config(tiny_cub, steps=3, sync_free=True, checkpoint_every=1, keep_checkpoints=5), run, resume=True)
    before, after = (run / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000003")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(before / name), weights(after / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state_before = torch.load(before / "state.pt", weights_only=True)["optimizer"]["state"]
    state_after = torch.load(after / "state.pt", weights_only=True)
    assert state_after["skipped_steps"] == 1
    for key, moments in state_before.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[name], state_after["optimizer"]["state"][key][name]), name

    nan_losses(monkeypatch, lambda call: True)
    with pytest.raises(TrainingError, match="not finite for 4 steps in a row"):  # found at the log interval
        train(config(tiny_cub, steps=9, sync_free=True, max_nonfinite=3, log_every=4), tmp_path / "bad")


def test_learning_rate_square_root_rule():
    assert TrainConfig(lr=1e-4).effective_lr == 1e-4
    assert TrainConfig(lr=1e-4, batch_size=128, lr_reference_batch=32).effective_lr == pytest.approx(2e-4)
    with pytest.raises(TrainingError, match="lr_reference_batch must not be negative"):
        TrainConfig(lr_reference_batch=-1).check()


def test_max_minutes_stops_with_a_resumable_checkpoint(tiny_cub, tmp_path):
    run = tmp_path / "run"
    latest = train(config(tiny_cub, steps=1000, max_minutes=1e-9, log_every=2), run)
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["reason"] == "signal"  # checked at log intervals: the first is step 2
    latest = train(config(tiny_cub, steps=4), run, resume=True)
    assert torch.load(latest / "state.pt", weights_only=True)["step"] == 4


def test_a_full_disk_ends_training_in_one_line_and_keeps_the_last_checkpoint(tiny_cub, tmp_path, monkeypatch, capsys):
    import birdgen.run_folder as folder_module
    from birdgen.cli import main as cli_main

    run = tmp_path / "run"
    real_save = folder_module.save_file
    calls = []

    def full_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint (model + EMA) is written, the second is not
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(folder_module, "save_file", full_disk)
    flags = ["train", "--out", str(run), "--data", str(tiny_cub), "--preset", "small", "--channels", "8,16",
             "--image-size", "16", "--steps", "4", "--checkpoint-every", "2", "--sample-every", "100",
             "--log-every", "2", "--batch-size", "4", "--noise-steps", "50", "--sample-steps", "5", "--no-progress"]
    assert cli_main(flags) == 1  # the machine's fault, not the command's: exit status 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step-0000004: could not write the checkpoint of step 4" in err
    assert "No space left on device" in err
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002"]  # no half-written .tmp folder
    monkeypatch.setattr(folder_module, "save_file", real_save)
    assert cli_main(flags[:1] + ["--out", str(run), "--resume"]) == 0
    assert (checkpoints / "step-0000004" / "state.pt").is_file()


def test_the_time_outlook_says_what_the_measured_pace_buys():
    from birdgen.run_config import FINE_TUNE_ACCURACY, time_outlook
    from birdgen.training_jobs import run_outlook

    text = time_outlook(16.0, 32, 3000, 15.0, fine_tune=True)  # 2 s a step
    assert text.startswith("at 16.0 images/s here, the 15-minute limit buys about 450 of 3,000 steps")
    (first, share), *_ = FINE_TUNE_ACCURACY
    assert f"{share:.0%} of the real pictures' class accuracy after {first:,} steps (about {first * 2 / 60:.0f} min here)" in text
    assert time_outlook(64.0, 64, 60, 0.0, fine_tune=False) == "at 64.0 images/s here, 60 steps take about 60 s"
    halved = time_outlook(16.0, 64, 3000, 15.0, fine_tune=True)  # the same images in half the steps
    assert "buys about 225 of 3,000 steps" in halved and f"after {first // 2:,} steps" in halved
    page = run_outlook([{"images_per_s": 16.0}], {"batch_size": 32, "steps": 3000, "max_minutes": 15.0,
                                                  "init_from": "models/small-attn", "conditional": True})
    assert page.startswith("At 16.0 images/s here") and page.endswith("(measured on 8 unseen species).")
    other_recipe = run_outlook([{"images_per_s": 16.0}], {"batch_size": 32, "steps": 3000, "max_minutes": 15.0,
                                                          "init_from": "models/small-attn", "conditional": True,
                                                          "lr": 1e-3, "freeze": "none"})
    assert other_recipe == "At 16.0 images/s here, the 15-minute limit buys about 450 of 3,000 steps."
    assert "class accuracy" not in run_outlook([{"images_per_s": 16.0}], {"batch_size": 32, "steps": 3000})
