"""Precise BatchNorm (issue 22, item 1): a model whose BatchNorm momentum cannot converge in a
short run (torchvision's MobileNetV3: 0.01) evaluates at chance with its running statistics, and
well with statistics recomputed over training batches; --precise_bn turns itself on for it, and
stays off where the statistics have converged (ResNet-18's 0.1 on the demo's 120 batches)."""

import pytest
import torch
import torchvision
from conftest import FAST, read_results
from torch import nn

from model import precise_bn_batches, recompute_batchnorm_statistics, unconverged_batchnorm

MOBILENET = ["--model", "mobilenet_v3_small", "--epochs", "1"]


def test_precise_batchnorm_is_why_a_short_mobilenet_run_learns_anything(run_cli, demo_data, tmp_path):
    """One epoch (3 steps) of MobileNetV3-small on the three colours: the same training either
    way, but with its own running statistics it answers one class for every image (chance: 1/3),
    with recomputed ones it tells the colours apart."""
    flags = ["--data_dir", demo_data, *FAST, *MOBILENET]
    code, out, err = run_cli(*flags, "--checkpoint_name", "precise")  # the default: on for this model and run
    assert code == 0, err
    assert (
        "precise BatchNorm is on: mobilenet_v3_small's BatchNorm momentum 0.01 would leave 97% of its initial "
        "statistics in them after this run's 3 training batches, so they are recomputed over 3 training batches "
        "before each validation (--precise_bn 0: off)"
    ) in out
    code, out, err = run_cli(*flags, "--checkpoint_name", "plain", "--precise_bn", "0")
    assert code == 0, err
    assert "precise BatchNorm" not in out
    precise, plain = (read_results(tmp_path / "checkpoints" / name) for name in ("precise", "plain"))
    assert plain["test_acc"] == pytest.approx(100 / 3) and plain["epochs"][0]["val_acc"] == pytest.approx(100 / 3)
    assert precise["test_acc"] >= 60 and precise["epochs"][0]["val_acc"] >= 60
    # The weights trained alike (BatchNorm in training uses each batch's own statistics); only the
    # running statistics differ.
    a, b = (
        torch.load(tmp_path / "checkpoints" / name / "last.pt", weights_only=True)["model"]
        for name in ("precise", "plain")
    )
    differ = sorted(key.rsplit(".", 1)[1] for key in a if not torch.equal(a[key], b[key]))
    assert set(differ) == {"running_mean", "running_var"}
    assert precise["finished"] and read_results(tmp_path / "checkpoints" / "precise")["test_acc"] == precise["test_acc"]
    code, out, err = run_cli("--checkpoint_name", "precise", "--evaluate", "--data_dir", demo_data, "--device", "cpu")
    assert code == 0 and f"test accuracy {precise['test_acc']:.2f}%" in out  # best.pt keeps the recomputed statistics


def built(name):
    return torchvision.models.get_model(name, num_classes=3)


def test_it_turns_itself_on_only_where_the_statistics_cannot_have_converged():
    resnet, mobilenet, vit = built("resnet18"), built("mobilenet_v3_small"), built("vit_b_16")
    # The default demo (15 batches x 8 epochs): ResNet-18's statistics converged (0.9^120 = 3e-6), so
    # nothing changes for it; MobileNetV3's did not (0.99^120 = 0.30).
    assert precise_bn_batches(resnet, "resnet18", None, 15, 8) == (0, "")
    batches, note = precise_bn_batches(mobilenet, "mobilenet_v3_small", None, 15, 8)
    assert batches == 15 and "momentum 0.01 would leave 30% of its initial statistics" in note
    # The full recipe (44 batches x 120 epochs) converges MobileNetV3's too; at most 100 batches.
    assert precise_bn_batches(mobilenet, "mobilenet_v3_small", None, 44, 120) == (0, "")
    assert precise_bn_batches(mobilenet, "mobilenet_v3_small", None, 200, 1)[0] == 100
    assert unconverged_batchnorm(resnet, 30) == (0.1, pytest.approx(0.9**30))
    # Asked for: as asked; 0: off; a model without BatchNorm says so and runs without.
    assert precise_bn_batches(resnet, "resnet18", 7, 15, 8)[0] == 7
    # (review) more batches than an epoch has: the line says how many are really used.
    assert precise_bn_batches(resnet, "resnet18", 1000, 15, 8)[1] == (
        "--precise_bn 1000: BatchNorm statistics recomputed over 15 training batches (all of an epoch's: it has 15) "
        "before each validation"
    )
    assert precise_bn_batches(mobilenet, "mobilenet_v3_small", 0, 15, 8) == (0, "")
    assert precise_bn_batches(vit, "vit_b_16", None, 15, 8) == (0, "")
    assert precise_bn_batches(vit, "vit_b_16", 5, 15, 8) == (
        0,
        "--precise_bn: vit_b_16 has no BatchNorm layers; nothing to recompute",
    )


class DropoutThenBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.bn = nn.Dropout(0.5), nn.BatchNorm1d(4, momentum=0.01)

    def forward(self, x):
        return self.bn(self.drop(x))


def test_the_statistics_are_the_plain_average_of_the_batches_seen_as_evaluation_sees_them():
    model = DropoutThenBatchNorm().train()
    model.bn.num_batches_tracked.fill_(9)
    batches = [torch.randn(8, 4) * (k + 1) + k for k in range(3)]
    rng = torch.random.get_rng_state()
    assert recompute_batchnorm_statistics([model], iter(batches), lambda: torch.autocast("cpu", enabled=False)) == 3
    # Dropout stayed off (no random number drawn): the statistics are those of the inputs themselves.
    assert torch.equal(torch.random.get_rng_state(), rng)
    torch.testing.assert_close(model.bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(model.bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    # Everything else as it was: the modes, the momentum, the training-batch count.
    assert model.training and model.drop.training and model.bn.training
    assert model.bn.momentum == 0.01 and int(model.bn.num_batches_tracked) == 9


def test_an_interrupted_recompute_leaves_the_statistics_as_they_were():
    model = DropoutThenBatchNorm().eval()
    model.bn.running_mean.fill_(3.0)

    def failing():
        raise RuntimeError("the loader broke")
        yield

    with pytest.raises(RuntimeError):
        recompute_batchnorm_statistics([model], failing(), lambda: torch.autocast("cpu", enabled=False))
    assert torch.equal(model.bn.running_mean, torch.full((4,), 3.0)) and model.bn.momentum == 0.01
    assert not model.training and not model.bn.training


def test_a_run_saved_before_the_flag_goes_on_without_it():
    import config

    cfg, explicit = config.parse_config(["--resume", "--device", "cpu"])
    saved = vars(config.parse_config(["--device", "cpu", "--model", "mobilenet_v3_small"])[0])
    del saved["precise_bn"]  # (a config.json written before --precise_bn)
    assert config.merge_resumed(saved, cfg, explicit).precise_bn == 0  # as it trained: no precise BatchNorm


def test_the_recompute_reads_nothing_back_from_the_device(monkeypatch):
    # momentum=None would make every BatchNorm layer read its num_batches_tracked back with float()
    # at every batch: on a GPU a host sync per layer and batch. The host counts the batches instead.
    model = DropoutThenBatchNorm()
    reads = []
    to_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or to_float(t))
    batches = [torch.randn(8, 4) * (k + 1) + k for k in range(3)]
    recompute_batchnorm_statistics([model], iter(batches), lambda: torch.autocast("cpu", enabled=False))
    monkeypatch.undo()
    assert reads == []
    torch.testing.assert_close(model.bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
