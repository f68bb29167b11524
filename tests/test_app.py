"""Every page under Streamlit's headless AppTest, on tiny models made by the tests."""

import json
import re
import time

import pytest
from streamlit.testing.v1 import AppTest

from birdgen.data import CropSettings, SplitSettings
from birdgen.model_folder import build_model, save_model
from birdgen.diffusion import DiffusionConfig
from birdgen.networks import preset
from birdgen.run_config import FINE_TUNE_DEFAULTS
from conftest import REPO

PAGES = REPO / "pages"
MODELS = REPO / "models"


@pytest.fixture
def models(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    for name, images_seen in (("small", 3200), ("small-attn", 6400)):
        model = build_model(preset(name, channels=(8, 16)), DiffusionConfig(num_steps=100))
        save_model(folder / name, model.network, model.network_config, model.diffusion_config,
                   training={"steps": images_seen // 32, "images_seen": images_seen, "train_hours": 0.1})
    monkeypatch.setenv("BIRDGEN_MODELS_DIR", str(folder))
    monkeypatch.setenv("BIRDGEN_RUNS_DIR", str(tmp_path / "runs"))
    return folder


def wait_for(condition, log_path, timeout_s=120):
    deadline = time.time() + timeout_s
    while time.time() < deadline and not condition():
        time.sleep(0.5)
    assert condition(), log_path.read_text()


def app(path) -> AppTest:
    test = AppTest.from_file(str(path), default_timeout=120)
    test.run()
    assert not test.exception, test.exception
    return test


def test_app_entry_point_opens_generate(models):
    at = app(REPO / "app.py")
    assert at.title[0].value.startswith("🐦 birdgen")


def test_generate_page(models):
    at = app(PAGES / "generate.py")
    assert at.title[0].value.startswith("🐦 birdgen")
    assert {s.label for s in at.selectbox} >= {"Model", "Sampler"}
    assert at.selectbox(key="model").value == "small-attn"
    assert at.selectbox(key="gen_sampler").value == "dpmpp" and at.slider(key="gen_steps_dpmpp").value == 10
    at.selectbox(key="gen_sampler").set_value("ddim").run()
    at.slider(key="gen_steps_ddim").set_value(3)
    at.number_input(key="gen_count").set_value(4)
    at.button(key="generate").click().run()
    assert not at.exception
    assert len(at.get("image")) == 1
    assert any("4 images in" in c.value and "parameters" in c.value for c in at.caption)
    assert len(at.get("download_button")) == 1


def test_generate_page_sampler_ranges_and_random_seed(models):
    at = app(PAGES / "generate.py")
    at.selectbox(key="gen_sampler").set_value("dpmpp").run()
    steps = at.slider(key="gen_steps_dpmpp")
    assert (steps.min, steps.max) == (3, 100)
    assert not any(s.label == "eta" for s in at.slider)
    before = at.number_input(key="gen_seed").value
    at.button(key="gen_random").click().run()
    assert at.number_input(key="gen_seed").value != before


def test_generate_page_without_models_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("BIRDGEN_MODELS_DIR", str(tmp_path / "empty"))
    at = app(REPO / "app.py")
    assert "No trained models" in at.warning[0].value


def test_bad_model_folder_shows_error_not_traceback(models):
    (models / "small-attn" / "model.safetensors").write_bytes(b"broken")
    at = app(REPO / "app.py")
    assert "Cannot load this model" in at.error[0].value


def test_denoising_page_forward_and_reverse(models, real_cub, monkeypatch):
    monkeypatch.setenv("BIRDGEN_DATA", str(real_cub))
    at = app(PAGES / "denoising.py")
    assert len(at.get("image")) == 1  # the forward-process frame
    at.number_input(key="forward_crop").set_value(3).run()
    assert not at.exception and len(at.get("image")) == 1
    t_slider = next(s for s in at.slider if s.label == "Timestep t")
    t_slider.set_value(99).run()
    assert at.get("image")[0].captions == ["x_t at t = 99"]
    at.slider(key="chain_steps_dpmpp").set_value(4)
    at.button(key="run_chain").click().run()
    assert not at.exception
    step = at.slider(key="chain_step")
    assert (step.min, step.max) == (1, 4)
    step.set_value(2).run()
    assert len(at.get("image")) == 3  # forward frame, the step, the chain strip
    assert at.get("image")[1].captions[0].startswith("after step 2 of 4")
    at.button(key="play").click().run()
    assert len(at.get("image")) == 4 and len(at.get("download_button")) == 2


def test_denoising_page_without_dataset_falls_back_to_generated(models, tmp_path, monkeypatch):
    monkeypatch.setenv("BIRDGEN_DATA", str(tmp_path / "no-data"))
    at = app(PAGES / "denoising.py")
    assert "No pictures found" in at.info[0].value and "Set BIRDGEN_DATA" in at.info[0].value
    assert len(at.get("image")) == 1


def test_compare_page_uses_same_noise(models):
    at = app(PAGES / "compare.py")
    assert at.selectbox(key="left").value == "small-attn" and at.selectbox(key="right").value == "small"
    at.slider(key="cmp_steps_dpmpp").set_value(3)
    at.number_input(key="cmp_count").set_value(2)
    at.button(key="compare").click().run()
    assert not at.exception and len(at.get("image")) == 2
    assert sum("parameters" in c.value for c in at.caption) == 2
    assert "small-attn was trained on 6,400 images and small on 3,200" in at.warning[0].value
    at.selectbox(key="left").set_value("small").run()
    assert not at.warning


def test_metrics_page_lists_models_and_evaluates_offline(models, tiny_cub, tmp_path, monkeypatch):
    import json

    from birdgen.data import load_crops, split_record

    (models / "small" / "metrics.json").write_text(
        '{"kid_mean": 0.2, "kid_std": 0.01, "fid": 90.0, "sampler": "ddim", "steps": 50, "num_generated": 100,'
        ' "num_real": 200, "split": "test"}')  # the format written before feature spaces were recorded
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("BIRDGEN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("BIRDGEN_DATA", str(tiny_cub))
    at = app(PAGES / "metrics.py")
    table = at.dataframe[0].value
    assert list(table["model"]) == ["small", "original report", "small-attn"] and table["FD"].iloc[0] == 90.0
    assert list(table["features"]) == ["inception", "inception", "not measured"]
    assert list(table["generated"]) [:2] == ["100", "not stated"] and table["FD"].iloc[1] == 92.47

    at.selectbox(key="eval_model").set_value("small-attn").run()
    assert "does not record the crops it trained on" in at.error[0].value  # refused before it starts, no traceback
    assert not any(b.key == "evaluate" for b in at.button)

    config = json.loads((models / "small-attn" / "config.json").read_text())
    crops = load_crops(tiny_cub, CropSettings(size=64), progress=False)
    config["data"] = split_record(crops, SplitSettings("random", 0, 0.3, "train"))
    (models / "small-attn" / "config.json").write_text(json.dumps(config))
    at = app(PAGES / "metrics.py")
    at.selectbox(key="eval_model").set_value("small-attn")
    at.selectbox(key="eval_features").set_value("mobilenet")
    at.number_input[0].set_value(10).run()
    estimate = next(c.value for c in at.caption if c.value.startswith("Estimated time on this machine"))
    assert "generating 10 birds" in estimate and "real crops" in estimate  # none of their features cached yet
    at.button(key="evaluate").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("MobileNetV1" in i.value for i in at.info)
    assert "in mobilenet features" in at.success[0].value
    assert "mobilenet" in json.loads((models / "small-attn" / "metrics.json").read_text())
    at = app(PAGES / "metrics.py")
    assert list(at.dataframe[0].value["features"]) == ["inception", "inception", "mobilenet"]
    assert len(at.get("image")) == 1  # the closest generated/training pairs
    at.selectbox(key="eval_model").set_value("small-attn")
    at.selectbox(key="eval_features").set_value("mobilenet").run()
    assert any("the real crops' features are cached" in c.value for c in at.caption)


def test_train_page_checks_pictures_and_refuses_what_cannot_train(models, tmp_path):
    from test_sources import bad_folder

    at = app(PAGES / "train.py")
    (tmp_path / "empty").mkdir()
    at.text_input(key="train_data").set_value(str(tmp_path / "empty")).run()
    assert "no pictures found" in at.error[0].value
    assert at.button[0].disabled  # Start needs pictures
    at.text_input(key="train_data").set_value(str(bad_folder(tmp_path / "bad"))).run()
    assert [m.value for m in at.metric][:3] == ["21", "4", "2"]  # pictures, cannot be used, classes
    assert "Fish/deeper/empty.jpg: empty file" in at.warning[0].value
    at.button[0].click().run()
    assert "4 pictures cannot be used" in at.error[0].value and not (tmp_path / "runs").exists()
    upload = at.file_uploader(key="train_upload")
    upload.set_value(("pictures.zip", b"hello, not a zip", "application/zip")).run()
    assert "not a readable zip archive" in at.error[0].value and at.button[0].disabled


def zipped(folder) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.jpg")):
            archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
    return buffer.getvalue()


def test_train_page_fine_tunes_an_uploaded_zip_stops_resumes_and_exports(models, tmp_path):
    from test_own_pictures import class_folder

    at = app(PAGES / "train.py")
    upload = zipped(class_folder(tmp_path / "my-birds"))
    at.file_uploader(key="train_upload").set_value(("my-birds.zip", upload, "application/zip")).run()
    assert not at.error and [m.value for m in at.metric][:3] == ["40", "0", "2"]
    assert "Kept (not extracted)" in at.caption[0].value and len(at.get("image")) == 1  # the preview
    assert at.selectbox(key="train_start_from").value == "small-attn" and at.toggle(key="train_conditional").value
    assert at.number_input(key="train_steps_Fine-tune a shipped model").value == 3000  # the fine-tune defaults
    assert at.selectbox(key="train_freeze").value == FINE_TUNE_DEFAULTS["freeze"]
    at.selectbox(key="train_freeze").set_value("outer")
    at.text_input(key="train_run").set_value("tiny")
    at.button[0].click().run()
    assert not at.exception and "Started training" in at.success[0].value
    log_path = tmp_path / "runs" / "tiny.log"
    try:
        wait_for(lambda: (tmp_path / "runs" / "tiny" / "run.json").is_file(), log_path)
        at.run()
        assert any(b.label.startswith("Stop") for b in at.button)
    finally:
        at.button(key="stop").click().run()
    assert any(s.value == "Stopped." for s in at.success)
    config = json.loads((tmp_path / "runs" / "tiny" / "config.json").read_text())
    assert config["init_from"].endswith("small-attn") and config["conditional"] and config["data"].endswith(".zip")
    assert config["freeze"] == "outer" and config["lr"] == FINE_TUNE_DEFAULTS["lr"]
    stopped_at = re.findall(r"Stopped by signal at step (\d+)", log_path.read_text())[-1]

    at.run()
    at.button(key="resume").click().run()
    assert not at.exception and at.success[0].value.startswith("Resumed")
    try:
        wait_for(lambda: "Resuming" in log_path.read_text(), log_path)
    finally:
        at.run()
        at.button(key="stop").click().run()
    assert f"from step-{int(stopped_at):07d} at step {stopped_at}" in log_path.read_text()

    at.run()
    at.text_input(key="export_name").set_value("my-birds")
    next(b for b in at.button if b.label == "Export").click().run()
    assert not at.exception and "Exported" in at.success[-1].value
    exported = models / "my-birds"
    assert (exported / "model.safetensors").is_file() and not list(models.glob(".exporting-*"))
    next(b for b in at.button if b.label == "Export").click().run()
    assert "already exists" in at.error[0].value
    generate = app(PAGES / "generate.py")
    assert "my-birds" in generate.selectbox(key="model").options  # every picker, no restart
    generate.selectbox(key="model").set_value("my-birds").run()
    assert not generate.exception and any("Class" in s.label for s in generate.selectbox)


def png_upload(mode="RGBA", size=(50, 40)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, "red" if mode != "P" else 3).save(buffer, "PNG")
    return buffer.getvalue()


def test_explore_page_interpolates_varies_and_inpaints(models):
    at = app(PAGES / "explore.py")
    assert at.title[0].value.startswith("🎨 Explore")
    at.slider(key="lerp_frames").set_value(3)
    at.slider(key="lerp_steps").set_value(5)
    at.button(key="lerp_run").click().run()
    assert not at.exception
    assert len(at.get("download_button")) == 2  # GIF and strip
    at.slider(key="lerp_frame").set_value(3).run()
    assert not at.exception and len(at.get("image")) == 4  # strip, chosen frame, and the other tabs' inputs

    at.slider(key="vary_steps").set_value(6)
    at.number_input(key="vary_count").set_value(2)
    at.slider(key="vary_strength").set_value(0.5)
    at.button(key="vary_run").click().run()
    assert not at.exception and len(at.get("download_button")) == 3

    at.radio(key="fill_source").set_value("your picture").run()
    at.file_uploader(key="fill_upload").set_value(("bird.png", png_upload(), "image/png")).run()
    at.selectbox(key="fill_mask").set_value("box").run()
    at.slider(key="fill_x").set_value((0.5, 0.5)).run()
    assert "need 0 ≤ left < right ≤ 1" in at.error[0].value  # an empty box is refused, not run
    at.slider(key="fill_x").set_value((0.25, 0.75))
    at.slider(key="fill_steps").set_value(10)
    at.slider(key="fill_resample").set_value(2)
    at.number_input(key="fill_count").set_value(1).run()
    at.button(key="fill_run").click().run()
    assert not at.exception and not at.error and len(at.get("download_button")) == 4


@pytest.mark.parametrize("data, message", [(b"\x89PNG\r\n\x1a\n truncated", "truncated or corrupt picture"),
                                           (b"%PDF-1.4", "not a PNG or JPEG picture")])
def test_explore_page_explains_bad_uploads(models, data, message):
    at = app(PAGES / "explore.py")
    at.radio(key="vary_source").set_value("your picture").run()
    at.file_uploader(key="vary_upload").set_value(("upload.png", data, "image/png")).run()
    assert not at.exception
    assert at.error[0].value.startswith("upload.png: ") and message in at.error[0].value
    assert not any(b.key == "vary_run" for b in at.button)


def test_species_controls_appear_only_for_a_species_model(models):
    from birdgen.diffusion import DiffusionConfig as Diffusion

    network = build_model(preset("small", channels=(8, 16), num_classes=2), Diffusion(num_steps=100))
    save_model(models / "species", network.network, network.network_config, network.diffusion_config,
               species=[[17, "017.Cardinal"], [47, "047.American_Goldfinch"]])
    at = app(PAGES / "generate.py")
    assert not [s for s in at.selectbox if s.label == "Species"]  # small-attn: unconditional, no picker
    at.selectbox(key="model").set_value("species").run()
    picker = at.selectbox(key="gen_species")
    assert picker.options == ["any species", "Cardinal (17)", "American Goldfinch (47)"]
    picker.set_value(17).run()
    at.slider(key="gen_guidance").set_value(2.0)
    at.slider(key="gen_steps_dpmpp").set_value(3)
    at.number_input(key="gen_count").set_value(2)
    at.button(key="generate").click().run()
    assert not at.exception
    assert "3 steps · seed 0 · Cardinal · species guidance 2 · 6 network evaluations" in at.get("image")[0].proto.imgs[0].caption

    for page, key in (("denoising.py", "chain_species"), ("compare.py", "cmp_species")):
        at = app(PAGES / page)
        assert not [s for s in at.selectbox if s.label == "Species"]
        select = at.selectbox(key="model" if page == "denoising.py" else "left")
        select.set_value("species").run()
        assert at.selectbox(key=key).options[0] == "any species"
    at.selectbox(key="cmp_species").set_value(47)
    at.number_input(key="cmp_count").set_value(2)
    at.slider(key="cmp_steps_dpmpp").set_value(3)
    at.button(key="compare").click().run()
    assert not at.exception and "small cannot take this species" in at.info[0].value


def test_explore_page_moves_between_species_for_a_species_model(models):
    from birdgen.diffusion import DiffusionConfig as Diffusion

    network = build_model(preset("small", channels=(8, 16), num_classes=2), Diffusion(num_steps=100))
    save_model(models / "species", network.network, network.network_config, network.diffusion_config,
               species=[[17, "017.Cardinal"], [47, "047.American_Goldfinch"]])
    at = app(PAGES / "explore.py")
    assert not [s for s in at.selectbox if s.label == "From species"]
    at.selectbox(key="explore_model").set_value("species").run()
    at.selectbox(key="lerp_from").set_value(17)
    at.selectbox(key="lerp_to").set_value(47)
    at.slider(key="lerp_frames").set_value(3)
    at.slider(key="lerp_steps").set_value(5).run()
    at.button(key="lerp_run").click().run()
    assert not at.exception and len(at.get("download_button")) == 2
    at.selectbox(key="vary_species").set_value(47).run()
    at.slider(key="vary_steps").set_value(5)
    at.number_input(key="vary_count").set_value(1).run()
    at.button(key="vary_run").click().run()
    assert not at.exception and len(at.get("download_button")) == 3


@pytest.fixture
def with_student(models):
    model = build_model(preset("small", channels=(8, 16)), DiffusionConfig(num_steps=100))
    save_model(models / "student", model.network, model.network_config, model.diffusion_config,
               sampling={"sampler": "ddim", "steps": 2},
               distillation={"method": "progressive distillation", "teacher": "models/small-attn", "teacher_steps": 4,
                             "rounds": 1, "round_steps": 10, "batch_size": 4, "lr": 1e-4, "images_seen": 40})
    return models


def test_a_student_samples_with_its_own_fixed_steps(with_student):
    at = app(PAGES / "generate.py")
    at.selectbox(key="model").set_value("student").run()
    assert not any(s.label == "Sampler" for s in at.selectbox) and not at.slider
    assert "distilled to sample in **2 DDIM steps**" in at.info[0].value
    at.button(key="generate").click().run()
    assert not at.exception
    assert "student · ddim · 2 steps" in at.get("image")[0].proto.imgs[0].caption

    at = app(PAGES / "compare.py")
    at.selectbox(key="left").set_value("student").run()
    assert "student (2 ddim steps) is a distilled student" in at.info[0].value
    at.number_input(key="cmp_count").set_value(2)
    at.button(key="compare").click().run()
    assert not at.exception and len(at.get("image")) == 2

    at = app(PAGES / "denoising.py")
    at.selectbox(key="model").set_value("student").run()
    at.button(key="run_chain").click().run()
    assert not at.exception
    assert at.slider(key="chain_step").max == 2


def test_explore_uses_a_students_steps_and_refuses_inpainting(with_student):
    at = app(PAGES / "explore.py")
    at.selectbox(key="explore_model").set_value("student").run()
    assert not at.exception
    assert any("RePaint needs the many ancestral steps" in i.value for i in at.info)
    assert [m.value for m in at.metric] == ["2", "2"]
    at.button(key="lerp_run").click().run()
    assert not at.exception and "lerp" in at.session_state


def test_metrics_page_evaluates_students_and_species_models_with_their_own_sampler(models, tiny_cub, monkeypatch):
    import json

    from birdgen.data import load_crops, split_record

    monkeypatch.setenv("BIRDGEN_DATA", str(tiny_cub))
    crops = load_crops(tiny_cub, CropSettings(size=64), progress=False)
    record = split_record(crops, SplitSettings("random", 0, 0.3, "train"))
    student = build_model(preset("small", channels=(8, 16)), DiffusionConfig(num_steps=100))
    save_model(models / "student", student.network, student.network_config, student.diffusion_config, data=record,
               sampling={"sampler": "ddim", "steps": 2})
    names = {int(c): crops.class_names[int(c)] for c in sorted(set(crops.labels.tolist()))}
    species = build_model(preset("small", channels=(8, 16), num_classes=len(names)), DiffusionConfig(num_steps=100))
    save_model(models / "species", species.network, species.network_config, species.diffusion_config, data=record,
               species=[[c, n] for c, n in names.items()])
    for name, sampler in (("student", "ddim 2 steps (the student's own)"), ("species", "ddim 50 steps")):
        at = app(PAGES / "metrics.py")
        at.selectbox(key="eval_model").set_value(name).run()
        assert any(sampler in c.value for c in at.caption), [c.value for c in at.caption]
        at.selectbox(key="eval_features").set_value("mobilenet")
        at.number_input[0].set_value(10)
        at.button(key="evaluate").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        stored = json.loads((models / name / "metrics.json").read_text())["mobilenet"]
        assert (stored["sampler"], stored["steps"]) == (("ddim", 2) if name == "student" else ("ddim", 50))
    assert "species accuracy top-1" in at.success[0].value
    assert stored["species_accuracy"]["classes"] == len(names)


def test_public_mode_turns_training_and_evaluation_off_and_limits_requests(models, monkeypatch):
    monkeypatch.setenv("BIRDGEN_PUBLIC", "1")
    monkeypatch.setenv("BIRDGEN_PUBLIC_MAX_EVALUATIONS", "40")
    at = app(PAGES / "train.py")
    assert "Training is off on this server" in at.info[0].value and not at.button and not at.text_input
    at = app(PAGES / "metrics.py")
    assert not any(b.key == "evaluate" for b in at.button) and at.dataframe
    at = app(PAGES / "generate.py")
    assert at.number_input(key="gen_count").max == 16
    at.number_input(key="gen_count").set_value(8)
    at.slider(key="gen_steps_dpmpp").set_value(6)
    at.button(key="generate").click().run()
    assert not at.exception and not at.get("image")
    assert at.error[0].value == ("8 images × 6 network evaluations = 48 is more than this public server allows per"
                                 " request (40): use fewer steps or images")
    at.number_input(key="gen_count").set_value(6)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error and len(at.get("image")) == 1


def test_a_full_queue_refuses_politely_in_public_mode(models, monkeypatch):
    from birdgen import ui

    monkeypatch.setenv("BIRDGEN_PUBLIC", "1")
    monkeypatch.setenv("BIRDGEN_PUBLIC_MAX_WAITING", "1")

    class Full:
        def turn(self, on_wait):
            from birdgen.pipeline import QueueFull

            raise QueueFull("1 requests are already waiting")

    monkeypatch.setattr(ui, "generation_queue", lambda: Full())
    at = AppTest.from_file(str(PAGES / "generate.py"), default_timeout=120)
    at.run()
    at.number_input(key="gen_count").set_value(1)
    at.slider(key="gen_steps_dpmpp").set_value(3)
    at.button(key="generate").click().run()
    assert not at.exception and not at.get("image")
    assert at.warning[0].value == ("The server is busy (1 requests are already waiting). Please try again in a"
                                   " minute.")


def test_autoguidance_controls_on_generate_compare_and_explore(models):
    import json

    guide = build_model(preset("small", channels=(8, 8)), DiffusionConfig(num_steps=100))
    save_model(models.parent / "guides" / "tiny-guide", guide.network, guide.network_config, guide.diffusion_config)
    config = json.loads((models / "small-attn" / "config.json").read_text())
    config["guidance"] = {"guide": "../../guides/tiny-guide", "guide_weight": 2.0, "interval": [30, 99]}
    (models / "small-attn" / "config.json").write_text(json.dumps(config))

    at = app(PAGES / "generate.py")
    assert at.toggle(key="gen_guided").value is True and at.slider(key="gen_guide_weight").value == 2.0
    at.slider(key="gen_steps_dpmpp").set_value(4)
    at.number_input(key="gen_count").set_value(2)
    at.button(key="generate").click().run()
    caption = at.get("image")[0].proto.imgs[0].caption
    assert not at.exception and "autoguidance by tiny-guide, w 2, t 30–99" in caption
    assert "4 evaluations of small-attn + 3 of its guide tiny-guide" in caption
    at.toggle(key="gen_guided").set_value(False).run()
    assert at.slider(key="gen_guide_weight").disabled
    at.button(key="generate").click().run()
    caption = at.get("image")[0].proto.imgs[0].caption
    assert "autoguidance" not in caption and "4 network evaluations" in caption

    at = app(PAGES / "compare.py")  # the same model guided and unguided from the same noise
    at.selectbox(key="right").set_value("small-attn").run()
    at.toggle(key="cmp_right_guided").set_value(False)
    at.slider(key="cmp_steps_dpmpp").set_value(4)
    at.number_input(key="cmp_count").set_value(2)
    at.button(key="compare").click().run()
    captions = [image.proto.imgs[0].caption for image in at.get("image")]
    assert not at.exception and "of its guide" in captions[0] and "of its guide" not in captions[1]

    at = app(PAGES / "explore.py")
    assert at.toggle(key="lerp_guided").value is True and at.toggle(key="fill_guided").value is True
    at.selectbox(key="explore_model").set_value("small").run()  # a model without a guide: no toggle
    assert not any(t.key == "lerp_guided" for t in at.toggle)


def test_the_train_forms_freeze_is_checked(tmp_path):
    from birdgen.training_jobs import TrainForm
    from test_own_pictures import class_folder

    data, shipped = str(class_folder(tmp_path / "birds")), str(MODELS / "small-attn")
    fine_tune = TrainForm.fine_tune(data, "run", shipped, conditional=False)
    fine_tune.validate()
    assert fine_tune.freeze == FINE_TUNE_DEFAULTS["freeze"]
    assert fine_tune.arguments()[fine_tune.arguments().index("--freeze") + 1] == fine_tune.freeze
    for form, message in ((TrainForm(data, "run", freeze="outer"), "training from scratch holds none"),
                          (TrainForm(data, "run", init_from=shipped, freeze="half"),
                           "freeze 'half': a fine-tune holds one of none, outer, convolutions fixed")):
        with pytest.raises(ValueError, match=message):
            form.validate()


def test_train_page_shows_the_line_a_run_ended_with(models, tmp_path):
    from dataclasses import asdict

    from birdgen.training_jobs import JOB_FILE, Job, TrainForm

    runs = tmp_path / "runs"
    (runs / "full").mkdir(parents=True)
    (runs / "full.log").write_text("Training…\nbirdgen: error: runs/full/checkpoints/step-0000004: could not write the"
                                   " checkpoint of step 4 (No space left on device)\n")
    form = TrainForm(str(tmp_path), "full")
    (runs / JOB_FILE).write_text(json.dumps(asdict(Job(2**22 + 12345, str(runs / "full"), time.time(), asdict(form)))))
    at = app(PAGES / "train.py")
    assert any("The run stopped:" in e.value and "No space left on device" in e.value for e in at.error)
