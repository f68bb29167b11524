import json

import pytest
import torch

from conftest import REPO

from birdgen.diffusion import DiffusionConfig
from birdgen.model_folder import RECORDS, ModelError, build_model, load_model, read_config, save_model
from birdgen.networks import preset

TINY = dict(channels=(16, 32), image_size=32)


@pytest.fixture
def model_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model(preset("small-attn", **TINY), DiffusionConfig(schedule="linear", prediction="v"))
    for p in model.network.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_model(tmp_path / "m", model.network, model.network_config, model.diffusion_config, card="# card\n")
    return tmp_path / "m", model


def test_round_trip_rebuilds_network_and_schedule(model_folder):
    folder, original = model_folder
    loaded = load_model(folder)
    assert loaded.network_config == original.network_config
    assert loaded.diffusion_config == original.diffusion_config
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(loaded.network(x, t), original.network(x, t))
    assert (folder / "README.md").read_text() == "# card\n"
    assert json.loads((folder / "config.json").read_text())["weights_dtype"] == "float32"


def test_half_precision_weights_load_as_float32(model_folder, tmp_path):
    _, original = model_folder
    save_model(tmp_path / "half", original.network, original.network_config, original.diffusion_config, half=True)
    loaded = load_model(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in loaded.network.parameters())
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (
        tmp_path.joinpath("m", "model.safetensors").stat().st_size)


def test_missing_weights(model_folder):
    folder, _ = model_folder
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model\.safetensors: missing weights file"):
        load_model(folder)


def test_truncated_weights(model_folder):
    folder, _ = model_folder
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="unreadable or truncated weights"):
        load_model(folder)


def test_config_that_does_not_match_weights(model_folder):
    folder, _ = model_folder
    config = json.loads((folder / "config.json").read_text())
    config["network"]["attention_resolutions"] = []
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"weights do not match the config: 0 missing.*unexpected"):
        load_model(folder)
    config["network"]["attention_resolutions"] = [8]
    config["network"]["channels"] = [16, 48]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="has shape"):
        load_model(folder)


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"),
                                           ('{"format": "other"}', "not a birdgen model config"),
                                           ('{"format": "birdgen-model", "network": {}}', "missing section 'diffusion'"),
                                           ('{"format": "birdgen-model", "network": {"fins": 1}, "diffusion": {}}',
                                            "unknown U-Net config keys: fins"),
                                           ('{"format": "birdgen-model", "network": {}, "diffusion": {},'
                                            ' "training": 5}', "'training' must be an object, not int"),
                                           ('{"format": "birdgen-model", "network": {"channels": "x"}, "diffusion": {}}',
                                            "network: channels must be a list of integers, not 'x'"),
                                           ('{"format": "birdgen-model", "network": {"image_size": 64.5}, "diffusion": {}}',
                                            "network: image_size must be an integer, not 64.5"),
                                           ('{"format": "birdgen-model", "network": {"dropout": true}, "diffusion": {}}',
                                            "network: dropout must be a number, not True"),
                                           ('{"format": "birdgen-model", "network": {}, "diffusion": {"num_steps": "9"}}',
                                            "diffusion: num_steps must be an integer, not '9'"),
                                           ('{"format": "birdgen-model", "network": {}, "diffusion": {"schedule": 3}}',
                                            "diffusion: schedule must be a string, not 3"),
                                           ('{"format": "birdgen-model", "network": {}, "diffusion": {},'
                                            ' "training": {"steps": 4, "images_seen": "many", "train_hours": 1}}',
                                            "'training': images_seen must be an integer, not 'many'"),
                                           ('{"format": "birdgen-model", "network": {}, "diffusion": {},'
                                            ' "distillation": {"teacher": "models/small-attn"}}',
                                            "'distillation': missing batch_size, images_seen, lr, method"),
                                           ('{"format": "birdgen-model", "network": {}, "diffusion": {},'
                                            ' "sampling": {"sampler": "ddim", "steps": 4000}}',
                                            "'sampling' must name a sampler")])
def test_bad_configs(model_folder, text, message):
    folder, _ = model_folder
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelError, match=message):
        load_model(folder)


def test_nan_weights_are_refused(model_folder):
    folder, original = model_folder
    with torch.no_grad():
        original.network.stem.weight[0, 0, 0, 0] = float("nan")
    save_model(folder, original.network, original.network_config, original.diffusion_config)
    with pytest.raises(ModelError, match="NaN"):
        load_model(folder)


def test_not_a_model_and_uncached_hub_id_offline(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="missing model config"):
        load_model(tmp_path)
    with pytest.raises(ModelError, match="no such model folder"):
        load_model(tmp_path / "nope" / "deeper")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not in the Hugging Face cache and the Hub cannot be reached"):
        load_model("someone/birdgen-birds")


def test_cached_hub_snapshot_loads_offline(model_folder, tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache (here a snapshot laid out by hand)."""
    folder, original = model_folder
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--birds" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (cache / "models--someone--birds" / "refs").mkdir()
    (cache / "models--someone--birds" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download

    try:
        loaded = load_model("someone/birds")
    except ModelError:
        pytest.skip(f"this huggingface_hub version does not read a monkeypatched cache ({snapshot_download})")
    assert loaded.network_config == original.network_config


@pytest.mark.parametrize("folder", sorted(p.name for p in (REPO / "models").iterdir() if (p / "config.json").is_file()))
def test_every_shipped_record_reads_as_typed_and_writes_back_unchanged(folder):
    raw = json.loads((REPO / "models" / folder / "config.json").read_text())
    records = read_config(REPO / "models" / folder)[2]
    for key, record_class in RECORDS.items():
        if key in raw:
            assert isinstance(records[key], record_class) and records[key].to_dict() == raw[key], key


def test_a_guided_stage_before_a_student_writes_the_json_it_reads():
    from birdgen.records import DistillationRecord

    stage = dict(method="progressive", teacher="models/t", teacher_steps=16, rounds=1, round_steps=8, batch_size=4,
                 lr=1e-4, images_seen=32)
    earlier = DistillationRecord(**stage, guide="models/g", guide_weight=2.5, guide_interval=(200, 999))
    record = DistillationRecord(**{**stage, "teacher_steps": 8}, earlier=earlier)
    written = record.to_dict()
    assert written == json.loads(json.dumps(written))  # lists, not tuples: what config.json gives back
    assert written["earlier"]["guide_interval"] == [200, 999]
    assert DistillationRecord.from_dict(written) == record
