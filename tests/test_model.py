"""ResNet-18 building and the ImageNet weights: from the hub cache, a file, or a clear error."""

import os

import pytest
import torch
from torchvision.models import resnet18

from model import build_model, cached_weights_path
from utils import UserError


def imagenet_like_state():
    torch.manual_seed(0)
    return resnet18().state_dict()  # 1000 classes, the shape of the ImageNet file


def test_missing_weights_say_where_to_put_them(offline_torch_home):
    expected = os.path.join(str(offline_torch_home), "hub", "checkpoints", "resnet18-f37072fd.pth")
    assert cached_weights_path() == expected
    with pytest.raises(UserError) as err:
        build_model(6)
    message = str(err.value)
    assert expected in message and "--pretrained_path" in message and "--no_pretrained" in message


def test_weights_in_the_hub_cache_are_used(offline_torch_home):
    state = imagenet_like_state()
    os.makedirs(os.path.dirname(cached_weights_path()))
    torch.save(state, cached_weights_path())
    model = build_model(4)
    assert model.fc.out_features == 4
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_pretrained_path_and_bad_files(tmp_path):
    path = tmp_path / "weights.pth"
    state = imagenet_like_state()
    torch.save(state, path)
    torch.testing.assert_close(build_model(3, pretrained_path=str(path)).conv1.weight, state["conv1.weight"])

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        build_model(3, pretrained_path=str(tmp_path / "junk.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="do not fit --model resnet18"):
        build_model(3, pretrained_path=str(tmp_path / "wrong.pth"))
    # A {"model": state dict} file that is not one of our runs names no model it would come from.
    torch.save({"model": {"stem.weight": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match=r"the weights in .*foreign.pth do not fit --model resnet18: missing: "):
        build_model(3, pretrained_path=str(tmp_path / "foreign.pth"))
    with pytest.raises(UserError, match="not found"):
        build_model(3, pretrained_path=str(tmp_path / "absent.pth"))


def test_random_init_needs_no_weights(offline_torch_home):
    model = build_model(5, pretrained=False)
    assert model.fc.out_features == 5
    assert set(model.state_dict()) == set(resnet18(num_classes=5).state_dict())


def test_cli_reports_missing_weights_in_one_line(offline_torch_home, demo_data, run_cli):
    from conftest import FAST

    flags = [f for f in FAST if f != "--no_pretrained"]
    code, out, err = run_cli("--data_dir", demo_data, "--epochs", "1", *flags)
    assert code == 2
    assert err.count("\n") == 1 and "resnet18-f37072fd.pth" in err and "Traceback" not in err
