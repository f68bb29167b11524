import threading
import time

import pytest
import torch

from birdgen.model_folder import ModelError, build_model, push_model, save_model
from birdgen.diffusion import DiffusionConfig
from birdgen.networks import preset
from birdgen.pipeline import GenerationRequest, generate
from birdgen.samplers import Cancelled


@pytest.fixture
def model():
    torch.manual_seed(0)
    built = build_model(preset("small-attn", channels=(8, 16), image_size=32), DiffusionConfig(num_steps=100))
    for p in built.network.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return built


def test_same_seed_same_images_and_noise_override(model):
    request = GenerationRequest("dpmpp", 4, 2, seed=11)
    first, second = generate(model, request), generate(model, request)
    assert torch.equal(first.images, second.images) and first.steps == 4
    other = generate(model, GenerationRequest("dpmpp", 4, 2, seed=12))
    assert not torch.equal(first.images, other.images)
    noise = torch.randn(2, 3, 32, 32)
    assert torch.equal(generate(model, request, noise=noise).images, generate(model, request, noise=noise).images)


def test_concurrent_generations_on_one_shared_model_do_not_interfere(model):
    """What several browser tabs do with the app's cached model."""
    requests = [GenerationRequest("ddpm", 6, 2, seed=s) for s in range(6)]
    expected = [generate(model, r).images for r in requests]
    results = [None] * len(requests)

    def work(i):
        results[i] = generate(model, requests[i]).images

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(a, b) for a, b in zip(results, expected))


def test_cancel_between_steps(model):
    with pytest.raises(Cancelled, match="after 2 of 10 steps"):
        generate(model, GenerationRequest("ddim", 10, 1), on_step=lambda step: step.index == 1)


def test_push_uploads_the_model_folder(model, tmp_path, monkeypatch):
    save_model(tmp_path / "m", model.network, model.network_config, model.diffusion_config, card="# m\n")
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls["upload"] = (folder_path, repo_id, kwargs)
            return type("Info", (), {"repo_url": f"hub/{repo_id}"})()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_model(tmp_path / "m", "me/birds", private=True) == "hub/me/birds"
    assert calls["create"] == ("me/birds", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"][0] == str(tmp_path / "m") and "model.safetensors" in calls["upload"][2]["allow_patterns"]
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing weights file"):
        push_model(tmp_path / "m", "me/birds")


def test_generation_queue_runs_one_at_a_time_in_order_and_skips_those_who_left():
    import threading
    import time

    from birdgen.pipeline import GenerationQueue

    queue = GenerationQueue()
    order, waits, running = [], {}, []
    gate = threading.Event()

    def user(name, leave_early=False):
        def on_wait(ahead):
            waits.setdefault(name, []).append(ahead)
            if leave_early:
                raise RuntimeError("page closed")
        try:
            with queue.turn(on_wait, poll_s=0.01):
                running.append(name)
                assert len(running) == 1  # never two at once
                order.append(name)
                if name == "first":
                    gate.wait(5)
                running.remove(name)
        except RuntimeError:
            order.append(f"{name} left")

    threads = [threading.Thread(target=user, args=("first",))]
    threads[0].start()
    time.sleep(0.05)
    for name, leave in (("second", False), ("quitter", True), ("third", False)):
        threads.append(threading.Thread(target=user, args=(name, leave)))
        threads[-1].start()
        time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert order == ["first", "quitter left", "second", "third"]
    assert waits["second"][0] == 1 and waits["third"][0] == 2  # its place in the queue, as the page shows it
    with queue.turn():  # the queue is free again
        pass


def test_a_queue_with_a_limit_refuses_past_it_at_once():
    import threading

    from birdgen.pipeline import GenerationQueue, QueueFull

    queue = GenerationQueue(max_waiting=1)
    release, entered = threading.Event(), threading.Event()

    def running():
        with queue.turn():
            entered.set()
            release.wait(5)

    def waiting():
        with queue.turn(poll_s=0.01):
            pass

    threads = [threading.Thread(target=running)]
    threads[0].start()
    entered.wait(5)
    threads.append(threading.Thread(target=waiting))
    threads[1].start()
    deadline = time.time() + 5
    while queue._waiting() < 1 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        with queue.turn():
            pass
    release.set()
    for thread in threads:
        thread.join(5)
    with queue.turn():  # free again
        pass
