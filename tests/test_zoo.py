"""--model: any classification model of torchvision by its name. Seven families train real steps
through the CLI (FP32, bf16 and float16 AMP, accumulation) and their best.pt loads into
torchvision's own model; heads are replaced whatever the model calls them; ImageNet weights come
from the hub cache, or the run stops in one line offline; unknown names and image sizes a model
cannot take are refused before any data is read; --evaluate, --resume and --benchmark use the
run's model."""

import json
import math
import os
import re

import pytest
import torch
import torchvision
from conftest import SimulatedCrash, assert_user_error, crash_in_epoch, make_colour_dataset, read_results

import benchmark
import config
import utils
from model import DEFAULT_MODEL, build_model, cached_weights_path, head_keys

# One epoch of 3 optimizer steps (12 training images in batches of 4) at 32 px, random init.
SMALL = [
    "--image_size",
    "32",
    "--batch_size",
    "4",
    "--no_pretrained",
    "--num_workers",
    "0",
    "--no_progress",
    "--device",
    "cpu",
    "--epochs",
    "1",
]
# What torchvision's builder needs besides the class count to take our checkpoints (model.BUILD_KWARGS).
TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
# (model, its head's layer, extra flags): one model a family, the heads named six ways.
FAMILIES = [
    # (float16: random-init models here overflow at GradScaler's first loss scales; this one does not.)
    ("mobilenet_v3_small", "classifier.3", ["--amp", "--amp_dtype", "float16", "--accum_steps", "2"]),
    ("efficientnet_b0", "classifier.1", ["--amp"]),
    ("regnet_y_400mf", "fc", ["--amp"]),
    ("squeezenet1_1", "classifier.1", ["--no_channels_last"]),  # the head is a 1x1 convolution
    ("shufflenet_v2_x0_5", "fc", ["--amp"]),
    ("googlenet", "fc", []),  # built without its auxiliary classifiers
    # (FP32: ConvNeXt-T's 28M parameters in bfloat16 take ~40 s here where bfloat16 is emulated)
    ("convnext_tiny", "classifier.2", []),  # after a LayerNorm
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Three colours, 5 training (4 after the validation split) and 1 test image each."""
    return make_colour_dataset(tmp_path_factory.mktemp("tiny"), train_per_class=5, test_per_class=1)


def load(path):
    return torch.load(path, weights_only=True)


def train(run_cli, data, name, *flags):
    code, out, err = run_cli("--data_dir", data, "--checkpoint_name", name, *SMALL, *flags)
    assert code == 0, err
    return out


def torchvision_model(name, num_classes):
    return torchvision.models.get_model(name, num_classes=num_classes, **TORCHVISION_KWARGS.get(name, {}))


# --------------------------------------------------------------------------- every family trains
@pytest.mark.parametrize("name,head,flags", FAMILIES, ids=[family[0] for family in FAMILIES])
def test_each_family_trains_and_its_best_pt_loads_into_torchvision(name, head, flags, run_cli, tiny_data, tmp_path):
    out = train(run_cli, tiny_data, name, "--model", name, *flags)
    run = tmp_path / "checkpoints" / name
    assert json.loads((run / "config.json").read_text())["model"] == name
    torch.manual_seed(42)  # --seed: the init the run started from
    initial = torchvision_model(name, 3).state_dict()
    parameters = sum(value.numel() for value in torchvision_model(name, 3).parameters())
    assert f"model: {name}, {parameters / 1e6:.2f}M parameters" in out
    assert head_keys(name) == (f"{head}.weight", f"{head}.bias")
    last = load(run / "last.pt")
    assert last["scheduler"]["last_epoch"] == (2 if "--accum_steps" in flags else 3)  # optimizer steps taken
    assert math.isfinite(read_results(run)["epochs"][0]["train_loss"])
    assert not torch.equal(last["model"][f"{head}.weight"], initial[f"{head}.weight"])  # it learned
    best = load(run / "best.pt")
    assert best["config"]["model"] == name
    plain = torchvision_model(name, 3)
    plain.load_state_dict(best["model"])  # strict: every key, no wrapper prefix
    assert plain.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 3)


# --------------------------------------------------------------------------- heads and weights
@pytest.mark.parametrize(
    "name,head,file_kwargs",
    [
        ("mobilenet_v3_small", "classifier.3", {}),
        ("squeezenet1_1", "classifier.1", {}),
        ("googlenet", "fc", {"aux_logits": True, "init_weights": True}),  # the ImageNet file has the auxiliary heads
    ],
)
def test_imagenet_weights_from_the_hub_cache_get_a_new_head(name, head, file_kwargs, offline_torch_home):
    torch.manual_seed(0)
    state = torchvision.models.get_model(name, **file_kwargs).state_dict()  # 1000 classes, as the ImageNet file
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = offline_torch_home / "hub" / "checkpoints" / os.path.basename(url)
    assert cached_weights_path(name) == str(path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    built = build_model(4, name=name).state_dict()
    heads = {f"{head}.weight", f"{head}.bias"}
    assert set(built) == set(torchvision_model(name, 4).state_dict())
    assert all(torch.equal(built[key], state[key]) for key in built if key not in heads)  # all but the head loaded
    assert built[f"{head}.weight"].shape[0] == 4 and built[f"{head}.bias"].shape == (4,)
    assert not torch.equal(built[f"{head}.weight"], state[f"{head}.weight"][:4])


def test_densenets_imagenet_file_with_its_older_layer_names_loads(offline_torch_home):
    torch.manual_seed(0)
    state = torchvision.models.densenet121().state_dict()
    # The ImageNet file's names: denselayer1.norm.1.weight for denselayer1.norm1.weight.
    older = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value for key, value in state.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in older
    os.makedirs(os.path.dirname(cached_weights_path("densenet121")))
    torch.save(older, cached_weights_path("densenet121"))
    built = build_model(2, name="densenet121").state_dict()
    assert built.keys() == state.keys()
    assert all(torch.equal(built[key], state[key]) for key in state if not key.startswith("classifier."))
    assert built["classifier.weight"].shape == (2, 1024)


def test_heads_of_the_other_families_are_found_without_building_them():
    assert head_keys("vit_b_16") == ("heads.head.weight", "heads.head.bias")
    assert head_keys("swin_t") == ("head.weight", "head.bias")
    assert head_keys("maxvit_t") == ("classifier.5.weight",)  # no bias
    assert head_keys("densenet121") == ("classifier.weight", "classifier.bias")
    assert head_keys("resnet18") == ("fc.weight", "fc.bias")


def test_offline_the_one_line_names_the_models_file(offline_torch_home, run_cli, tiny_data):
    pretrained = [flag for flag in SMALL if flag != "--no_pretrained"]
    code, out, err = run_cli("--data_dir", tiny_data, "--model", "efficientnet_b0", *pretrained)
    url = torchvision.models.get_model_weights("efficientnet_b0").DEFAULT.url
    expected = os.path.join(str(offline_torch_home), "hub", "checkpoints", "efficientnet_b0_rwightman-7f5810bc.pth")
    assert_user_error((code, out, err), "efficientnet_b0", expected, url, "--pretrained_path", "--no_pretrained")


# --------------------------------------------------------------------------- refused up front
def test_unknown_names_are_refused_with_the_close_ones(run_cli, tmp_path):
    result = run_cli("--data_dir", tmp_path / "no_data", "--model", "resnet181", *SMALL)
    assert_user_error(result, "--model 'resnet181'", "close matches: resnet18, ")
    assert_user_error(run_cli("--data_dir", tmp_path / "no_data", "--model", "vit_b16", *SMALL), "vit_b_16")
    assert not (tmp_path / "checkpoints").exists()


def test_image_sizes_a_model_cannot_take_are_refused(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where --demo would write its data
    result = run_cli("--data_dir", tmp_path / "no_data", "--model", "vit_b_16", *SMALL)
    assert_user_error(result, "--model vit_b_16 takes 224 x 224 images only; pass --image_size 224")
    # --demo's 64 px too, unless the size is given.
    assert_user_error(run_cli("--demo", "--model", "vit_b_16", "--device", "cpu"), "pass --image_size 224")
    cfg, _ = config.parse_config(["--demo", "--model", "vit_b_16", "--image_size", "224", "--device", "cpu"])
    assert (cfg.model, cfg.image_size) == ("vit_b_16", 224)
    result = run_cli("--data_dir", tmp_path / "no_data", "--model", "alexnet", *SMALL)
    assert_user_error(result, "--model alexnet needs images of at least 63 x 63; pass --image_size 63 or more")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- the run's model, later
def test_resume_and_evaluate_rebuild_the_runs_model(run_cli, tiny_data, tmp_path, monkeypatch):
    # mobilenet_v3_small has dropout: a resumed run must draw its masks as the uninterrupted one did.
    flags = ["--model", "mobilenet_v3_small", "--epochs", "2", "--warmup_epochs", "0", "--deterministic"]
    train(run_cli, tiny_data, "full", *flags)
    restore = crash_in_epoch(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        train(run_cli, tiny_data, "cut", *flags)
    restore()
    refused = run_cli(
        "--data_dir", tiny_data, "--checkpoint_name", "cut", "--resume", "--model", "resnet18", "--device", "cpu"
    )
    assert_user_error(refused, "--model mobilenet_v3_small", "not with --model resnet18")
    code, out, err = run_cli(
        "--data_dir",
        tiny_data,
        "--checkpoint_name",
        "cut",
        "--resume",
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--no_progress",
    )
    assert code == 0, err
    assert "resuming cut: after epoch 1" in out and "model: mobilenet_v3_small" in out
    full, cut = (load(tmp_path / "checkpoints" / name / "last.pt") for name in ("full", "cut"))
    assert full["model"].keys() == cut["model"].keys()
    assert all(torch.equal(value, cut["model"][key]) for key, value in full["model"].items())  # bit for bit
    code, out, err = run_cli(
        "--data_dir", tiny_data, "--checkpoint_name", "cut", "--evaluate", "--device", "cpu", "--num_workers", "0"
    )
    assert code == 0, err
    assert f"test accuracy {read_results(tmp_path / 'checkpoints' / 'cut')['test_acc']:.2f}%" in out

    # Its best.pt as --pretrained_path: the same classes keep the head, others get a new one,
    # another model is refused naming it.
    best = str(tmp_path / "checkpoints" / "cut" / "best.pt")
    trained = load(best)["model"]
    classes = ["blue", "green", "red"]
    kept = build_model(3, pretrained_path=best, class_names=classes, name="mobilenet_v3_small").state_dict()
    assert all(torch.equal(kept[key], value) for key, value in trained.items())
    tuned = build_model(2, pretrained_path=best, class_names=["a", "b"], name="mobilenet_v3_small").state_dict()
    assert tuned["classifier.3.weight"].shape == (2, 1024)
    assert torch.equal(tuned["features.0.0.weight"], trained["features.0.0.weight"])
    with pytest.raises(
        utils.UserError,
        match=r"holds a --model mobilenet_v3_small run.s weights, which do not fit "
        r"--model shufflenet_v2_x0_5; pass --model mobilenet_v3_small",
    ):
        build_model(3, pretrained_path=best, class_names=classes, name="shufflenet_v2_x0_5")


def test_runs_saved_before_model_existed_are_resnet18():
    assert DEFAULT_MODEL == config.build_parser().parse_args([]).model == "resnet18"
    cfg, explicit = config.parse_config(["--evaluate", "--device", "cpu"])
    saved = vars(config.parse_config(["--device", "cpu", "--model", "squeezenet1_0"])[0])
    del saved["model"]
    assert config.merge_saved(saved, cfg, explicit, config.EVALUATE_OVERRIDES).model == "resnet18"


def test_benchmark_times_the_chosen_model(run_cli, tmp_path, monkeypatch):
    built = []
    real_build_model = benchmark.build_model

    def build_model_spy(*args, **kwargs):
        built.append(real_build_model(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(benchmark, "build_model", build_model_spy)
    code, out, err = run_cli(
        "--benchmark",
        "--model",
        "squeezenet1_1",
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--image_size",
        "32",
        "--benchmark_steps",
        "1",
        "--checkpoint_name",
        "bench",
    )
    assert code == 0, err
    assert "benchmark: squeezenet1_1 training steps (adam), batch 2, 32x32 px" in out
    assert json.loads((tmp_path / "checkpoints" / "bench" / "benchmark.json").read_text())["model"] == "squeezenet1_1"
    assert len(built) == 4 and all(isinstance(m, torchvision.models.SqueezeNet) for m in built)  # a row each


def test_zero_init_residual_names_a_model_without_residual_blocks(capsys):
    utils.setup_logging()
    build_model(3, pretrained=False, zero_residual=True, name="mobilenet_v3_small")
    assert capsys.readouterr().out.startswith("--zero_init_residual: mobilenet_v3_small has no ResNet residual blocks")
