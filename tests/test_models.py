import numpy as np
import pytest

import flowvision.models.utils as fv_utils
from core import models as M
from core.backend import flow


def features(model, head):
    """Outputs with the new head's weights fixed, so that two models can be compared."""
    module = dict(model.named_modules())[head]
    module.weight.data = flow.ones(*module.weight.shape) * 0.01
    module.bias.data = flow.zeros(*module.bias.shape)
    model.eval()
    x = flow.tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    with flow.no_grad():
        return model(x).numpy()


def test_state_dict_file_round_trip(tmp_path):
    flow.manual_seed(1)
    source, head = M.build_model("resnet18", 10, "none")
    flow.save(source.state_dict(), str(tmp_path / "weights"))
    flow.manual_seed(2)
    loaded, _ = M.build_model("resnet18", 10, str(tmp_path / "weights"))
    flow.manual_seed(3)
    fresh, _ = M.build_model("resnet18", 10, "none")
    assert np.array_equal(features(source, head), features(loaded, head))
    assert not np.allclose(features(source, head), features(fresh, head))


def test_imagenet_sized_head_is_dropped(tmp_path):
    """A 1000-class ImageNet state dict loads into a 10-class model (the head is replaced)."""
    flow.manual_seed(1)
    imagenet = M.build_model("resnet18", 1000, "none")[0]
    flow.save(imagenet.state_dict(), str(tmp_path / "in1k"))
    model, head = M.build_model("resnet18", 10, str(tmp_path / "in1k"))
    assert model.fc.out_features == 10 and head == "fc"
    assert np.array_equal(model.conv1.weight.numpy(), imagenet.conv1.weight.numpy())


def test_mismatched_architecture_names_the_keys(tmp_path):
    source, _ = M.build_model("resnet18", 10, "none")
    flow.save(source.state_dict(), str(tmp_path / "r18"))
    with pytest.raises(M.WeightsError) as info:
        M.build_model("resnet34", 10, str(tmp_path / "r18"))
    message = str(info.value)
    assert "do not match" in message and "missing: layer1.2." in message


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(M.WeightsError, match="does not exist"):
        M.build_model("resnet18", 10, str(tmp_path / "nope"))


def test_imagenet_offline_gives_a_clear_error(monkeypatch):
    from urllib.error import URLError

    def offline(url, *args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(fv_utils, "urlopen", offline)  # the real download code, without a network
    assert not M.imagenet_cached("resnet18")
    with pytest.raises(M.WeightsError) as info:
        M.build_model("resnet18", 10, "imagenet")
    message = str(info.value)
    assert "could not be downloaded" in message and "resnet18.zip" in message
    assert str(M.imagenet_cache_path("resnet18")) in message and "pretrained none" in message


def test_imagenet_weights_come_from_flowvisions_cache():
    flow.manual_seed(5)
    weights = M.build_model("resnet18", 1000, "none")[0]
    flow.save(weights.state_dict(), str(M.imagenet_cache_path("resnet18")))
    assert M.imagenet_cached("resnet18")
    model, _ = M.build_model("resnet18", 10, "imagenet")
    assert np.array_equal(model.layer4[1].conv2.weight.numpy(), weights.layer4[1].conv2.weight.numpy())


@pytest.mark.parametrize("backbone,head", [("resnet50", "fc"), ("mobilenet_v2", "classifier.1"),
                                           ("mobilenet_v3_small", "classifier.3")])
def test_heads_are_replaced(backbone, head):
    model, name = M.build_model(backbone, 7, "none")
    assert name == head
    assert dict(model.named_modules())[head].out_features == 7
