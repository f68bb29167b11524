import pytest
import torch

from birdgen.networks import PRESETS, UNet, UNetConfig, parameter_count, preset


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "baseline"])
def test_presets_run_forward_and_backward(name):
    network = UNet(preset(name)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out = network(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in network.parameters())


def test_any_channel_widths_build():
    # 48 + 96 = 144 channels meet in the decoder; 32 groups do not divide them.
    network = UNet(preset("small-attn", channels=(48, 96, 96)))
    assert network(torch.randn(1, 3, 64, 64), torch.tensor([5])).shape == (1, 3, 64, 64)
    norms = {m.num_channels: m.num_groups for m in network.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms[144] == 24 and norms[96] == 24 and norms[48] == 12


def test_group_counts_of_the_shipped_shapes_are_unchanged():
    # Shipped weights were trained with min(32, channels // 4) groups; widths it divides keep it.
    network = UNet(preset("small-attn"))
    norms = {m.num_channels: m.num_groups for m in network.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms == {channels: min(32, channels // 4) for channels in norms}


def test_baseline_builds_with_attention_at_two_resolutions():
    config = preset("baseline")
    network = UNet(config)
    attention_layers = [m for m in network.modules() if type(m).__name__ == "SelfAttention"]
    assert config.attention_resolutions == (16, 8) and len(attention_layers) > 4
    assert parameter_count(network) > 30_000_000


def test_attention_is_the_only_difference_between_small_presets():
    plain, attn = preset("small"), preset("small-attn")
    assert plain.attention_resolutions == () and attn.attention_resolutions == (8,)
    assert {k: v for k, v in plain.to_dict().items() if k != "attention_resolutions"} == \
           {k: v for k, v in attn.to_dict().items() if k != "attention_resolutions"}
    assert parameter_count(UNet(attn)) > parameter_count(UNet(plain))


def test_timestep_changes_output():
    torch.manual_seed(0)
    for name in ("small", "keras"):
        network = UNet(preset(name, channels=(16, 32))).eval()
        for p in network.parameters():
            torch.nn.init.normal_(p, std=0.05)
        x = torch.randn(1, 3, 64, 64)
        assert not torch.allclose(network(x, torch.tensor([10])), network(x, torch.tensor([900])))


def test_bfloat16_autocast_on_cpu():
    network = UNet(preset("small-attn", channels=(16, 32)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = network(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16():
    network = UNet(preset("small-attn")).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        out = network(torch.randn(2, 3, 64, 64, device="cuda"), torch.tensor([1, 2], device="cuda"))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 60}, "not divisible"),
    ({"time_conditioning": "nowhere"}, "time_conditioning"),
    ({"blocks_per_level": 0}, "blocks_per_level"),
    ({"channels": ()}, "channels"),
])
def test_bad_network_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("small", **overrides)


def test_unknown_preset_and_config_keys():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown U-Net config keys: wings"):
        UNetConfig.from_dict({"wings": 2})
