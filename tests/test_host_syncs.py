"""The training loop never makes the host wait for the GPU (issue 21), as far as a CPU can show it:
the counting, the skipped-step guard, the flip mask and the stop agreement keep their results
while their device work changes; --benchmark times what a training step does; the steady-state
peak memory. The GPU half of the check is tests/test_cuda.py (benchmarks/sync_check.py)."""

import os
import signal
import sys

import pytest
import torch
from conftest import ROOT
from torchvision.models import resnet18

import benchmark
import metrics
from checkpoint import GracefulStop
from dataset import DeviceTransform, flip_mask
from metrics import ClassificationMeter, PeakMemory
from step import HOST_SYNC_OPTIMIZERS, SkippedStepGuard, build_optimizer

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("num_classes", [2, 6, 37])
def test_meter_counts_equal_bincounts_on_random_batches(num_classes, deterministic):
    generator = torch.Generator().manual_seed(num_classes)
    meter = ClassificationMeter(num_classes, "cpu")
    expected = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for batch in (1, 7, 64, 256):  # (deterministic mode on: scatter_add_ must pass it)
        targets = torch.randint(0, num_classes, (batch,), generator=generator)
        logits = torch.randn(batch, num_classes, generator=generator)
        meter.update(torch.tensor(0.5), logits, targets)
        expected += torch.bincount(targets * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    assert torch.equal(meter.confusion, expected)
    stats = meter.compute()
    assert stats["count"] == 328 and torch.equal(stats["confusion"], expected.view(num_classes, -1))


def nan_buffers(model):
    for b in model.buffers():
        if b.is_floating_point():
            b.fill_(float("nan"))


def test_guard_puts_back_a_skipped_steps_buffers_and_keeps_a_clean_steps():
    model = resnet18(num_classes=3).train()
    guard = SkippedStepGuard(model, enabled=True)
    assert [saved.dtype for _, saved, *_ in guard.groups] == [torch.float32, torch.int64]  # one flat copy each
    for skipped in (False, True, False, True):
        guard.save()
        before = {k: v.clone() for k, v in model.state_dict().items() if k in dict(model.named_buffers())}
        model(torch.randn(4, 3, 32, 32))  # moves the running statistics and the step counters
        after = {k: v.clone() for k, v in model.named_buffers()}
        if skipped:
            nan_buffers(model)  # what an overflowing float16 forward may leave
        guard.restore_if(torch.tensor(skipped))
        expected = before if skipped else after
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, expected[name]), (skipped, name)
    # Disabled (no GradScaler): nothing kept, nothing put back.
    off = SkippedStepGuard(model, enabled=False)
    off.save()
    nan_buffers(model)
    off.restore_if(torch.tensor(True))
    assert all(torch.isnan(b).all() for b in model.buffers() if b.is_floating_point())


def test_flip_mask_and_device_transform_are_unchanged_on_the_cpu():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    mask = flip_mask(16, 1234, "cpu")
    reference = torch.rand(16, generator=torch.Generator().manual_seed(1234)) < 0.5  # the mask before issue 21
    assert torch.equal(mask, reference) and not mask.is_pinned()
    transform = DeviceTransform("cpu")
    flipped = torch.where(reference.view(-1, 1, 1, 1), images.flip(-1), images).float()
    assert torch.equal(transform(images, flip_seed=1234), flipped.mul_(transform.scale).sub_(transform.shift))


def test_one_process_stops_at_the_next_step_whatever_the_agreement_interval():
    stop = GracefulStop()
    assert not stop.requested(agree=False) and not stop.requested()
    stop.signal = signal.SIGTERM  # (what the handler sets)
    assert stop.requested(agree=False) and stop.requested()  # alone: no collective, no wait


def test_host_sync_optimizers_are_the_ones_torch_steps_through_item():
    # GradScaler.step reads its inf/NaN flag with .item() unless the optimizer has
    # _step_supports_amp_scaling (torch/amp/grad_scaler.py); torch 2.14 gives it to the fused kernels.
    from config import OPTIMIZERS

    model = torch.nn.Linear(2, 2)
    for name in OPTIMIZERS:
        cfg = type("Cfg", (), dict(optimizer=name, learning_rate=0.1, weight_decay=0.0, momentum=0.9, nesterov=False))()
        optimizer = build_optimizer(model, cfg)
        assert getattr(optimizer, "_step_supports_amp_scaling", False) == (name not in HOST_SYNC_OPTIMIZERS), name
    assert "fused" not in torch.optim.RAdam.__init__.__code__.co_varnames  # none to switch to


def test_benchmark_steps_update_the_meter_and_health_like_training():
    # (The header that says so and `--optimizer radam` in benchmark.json: tests/test_benchmark.py.)
    cfg = type(
        "Cfg",
        (),
        dict(
            device="cpu",
            model="resnet18",
            batch_size=2,
            image_size=32,
            optimizer="adam",
            learning_rate=1e-3,
            weight_decay=0.0,
        ),
    )()
    row = benchmark.TrainingSteps(cfg, "amp_float16", channels_last=False)  # GradScaler, the guard
    for _ in range(2):
        row.step()
    assert row.meter.count() == 4  # every step's images counted, as a training step counts them
    assert int(row.health.skipped_steps) + int(row.health.grad_norms.count) == 2  # every step's outcome


def test_peak_memory_steady_state_leaves_out_the_sessions_first_epoch(monkeypatch):
    peaks = iter([5000.0, 3000.0, 3100.0])
    monkeypatch.setattr(metrics, "reset_peak_memory", lambda device: None)
    monkeypatch.setattr(metrics, "peak_memory_mb", lambda device: next(peaks))
    memory = PeakMemory(torch.device("cuda"))
    numbers = []
    for _ in range(3):
        memory.start_epoch()
        numbers.append(memory.epoch_numbers())
    assert numbers == [
        {"peak_mem_mb": 5000.0, "steady_peak_mem_mb": None},
        {"peak_mem_mb": 3000.0, "steady_peak_mem_mb": 3000.0},
        {"peak_mem_mb": 3100.0, "steady_peak_mem_mb": 3100.0},
    ]
    monkeypatch.undo()
    cpu = PeakMemory(torch.device("cpu"))
    cpu.start_epoch()
    cpu.start_epoch()
    assert cpu.epoch_numbers() == {"peak_mem_mb": None, "steady_peak_mem_mb": None}


def test_sync_check_script_runs_the_trainer_with_its_reads_allowed_on_the_cpu():
    import sync_check

    results = sync_check.check_all("cpu", cases=["fp32"], steps=4, log_interval=2, batch_size=2)
    # 4 checked steps after 4 unchecked ones; reads at steps 6 and 8 (every 2, and the epoch's last).
    assert results == {"fp32": {"steps": 4, "log_reads": 2, "sync": None, "expected_sync": False, "ok": True}}
    assert sync_check.report_lines(results, "cpu")[0].startswith("- on the CPU nothing waits")


def test_sync_check_names_where_radams_expected_sync_stopped_its_steps(monkeypatch):
    # On a GPU, set_sync_debug_mode("error") makes GradScaler's .item() raise at the first checked
    # step of radam + float16: imitated here, the check names that call and counts no step after it
    # (what tests/test_cuda.py expects of that case).
    import sync_check

    checking = [False]
    monkeypatch.setattr(sync_check, "set_sync_check", lambda on, device: checking.__setitem__(0, on))
    opt_step = torch.amp.GradScaler._maybe_opt_step

    def item_raises_when_checked(self, *args, **kwargs):
        if checking[0]:
            raise RuntimeError("called a synchronizing CUDA operation")
        return opt_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "_maybe_opt_step", item_raises_when_checked)
    result = sync_check.check_all("cpu", cases=["radam_float16"], steps=2, log_interval=2, batch_size=2)[
        "radam_float16"
    ]
    assert "synchronizing" in result["sync"]  # (the imitation's own line: the last of this project's frames)
    assert (result["steps"], result["log_reads"], result["expected_sync"], result["ok"]) == (0, 0, True, True)
