"""Session 48 (image preprocessing audit): the images are fed as timm feeds them.

- a timm folder built with ``model_args`` ``img_size`` (a fixed-size ViT) whose ``pretrained_cfg`` still
  says the architecture's size (as older timm wrote it) was fed at that size -- other figures than
  plain timm's, or an internal error from the ViT's size assertion;
- a network that asserts its input size (timm's PatchEmbed) given images of another size is bad input
  naming it, never an internal error;
- a bare weights file ``repair fix`` wrote is read back with the preprocessing it records (as its class
  names are), unless options say otherwise.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import make_images
from repair.errors import BadInput


def _vit_folder(path: Path) -> Path:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    save_for_hf(m, str(path), model_config={"label_names": ["cat", "dog", "fox"]}, safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    # as an older timm wrote it: the architecture's own size beside the img_size the network was built with
    cfg["pretrained_cfg"].update({"input_size": [3, 160, 160], "fixed_input_size": True, "crop_pct": 1.0})
    cfg["model_args"] = {"img_size": 32}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_a_timm_folder_built_with_img_size_is_fed_as_plain_timm_feeds_it(tmp_path):
    import timm

    import repair

    f = _vit_folder(tmp_path / "vit")
    plain = timm.create_model(f"local-dir:{f}", pretrained=True)
    want = timm.data.resolve_data_config({}, model=plain)
    a = repair.load_model(f)
    assert tuple(a.data_config["input_size"]) == tuple(want["input_size"]) == (3, 32, 32)
    data = make_images(tmp_path / "d", n_per_class=2, size=40)
    r = repair.evaluate(f, data)                 # fed at 32: the strict ViT runs
    assert r["n"] == 6


def test_a_network_that_asserts_its_input_size_is_bad_input(tmp_path):
    import timm
    from safetensors.torch import save_file

    import repair
    from repair.adapters import LoadOptions

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)      # strict: 224 only
    bare = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bare))
    data = make_images(tmp_path / "d", n_per_class=2, size=40)
    with pytest.raises(BadInput, match="forward pass fails on this data .*AssertionError"):
        repair.evaluate(bare, data, load_options=LoadOptions(arch="vit_tiny_patch16_224", image_size=64,
                                                             class_names=["cat", "dog", "fox"]))


def test_a_bare_file_is_read_back_with_the_preprocessing_it_records(tmp_path):
    import timm
    from safetensors.torch import save_file

    import repair
    from repair.adapters import LoadOptions

    torch.manual_seed(0)
    m = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    recorded = {"input_size": [3, 40, 40], "interpolation": "bilinear", "mean": [0.4, 0.4, 0.4],
                "std": [0.3, 0.3, 0.3], "crop_pct": 1.0, "crop_mode": "center"}
    bare = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bare),
              metadata={"repair.settings": json.dumps({"preprocess": {"image": recorded},
                                                       "classes": ["cat", "dog", "fox"]})})
    a = repair.load_model(bare, LoadOptions(arch="test_resnet"))
    assert tuple(a.data_config["input_size"]) == (3, 40, 40)
    assert list(a.data_config["mean"]) == pytest.approx([0.4] * 3)
    # options given win over the record
    b = repair.load_model(bare, LoadOptions(arch="test_resnet", image_size=48))
    assert tuple(b.data_config["input_size"]) == (3, 48, 48)


def test_an_image_size_out_of_range_names_the_option(tmp_path):
    import timm
    from safetensors.torch import save_file

    import repair
    from repair.adapters import LoadOptions

    m = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    bare = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bare))
    with pytest.raises(BadInput, match="--image-size 5000: input_size 3x5000x5000 is out of range") as e:
        repair.load_model(bare, LoadOptions(arch="test_resnet", image_size=5000, class_names=["a", "b", "c"]))
    assert str(bare) not in str(e.value)


def _bare(tmp_path: Path, arch: str, image=None, **kw) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, num_classes=3, **kw)
    bare = tmp_path / f"{arch}.safetensors"
    meta = {} if image is None else {"repair.settings": json.dumps({"preprocess": {"image": image},
                                                                    "classes": ["cat", "dog", "fox"]})}
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bare), metadata=meta)
    return bare


#: a whole record as repair fix writes it (a record without its size or normalisation is refused as such:
#: tests/test_recorded_state_s49.py); the cases below change one value of it
WHOLE = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
         "crop_pct": 1.0, "crop_mode": "center"}


@pytest.mark.parametrize("image,words", [
    ("garbage", "not an object"),
    ({**WHOLE, "input_size": [3, 48]}, "three whole numbers"),
    ({**WHOLE, "input_size": []}, "empty or zero"),
    ({**WHOLE, "mean": ["0.5", "0.5", "0.5"]}, "mean must be one or three numbers"),
])
def test_a_bad_recorded_preprocessing_is_refused_naming_the_file_before_timms_rewrite(tmp_path, image, words):
    """(review) checked as written: timm's img_size rewrite of a fixed-size network replaced a bad size
    unseen, or failed on it with an IndexError."""
    import repair
    from repair.adapters import LoadOptions

    bare = _bare(tmp_path, "test_vit_relpos", image, img_size=64)
    with pytest.raises(BadInput, match=words) as e:
        repair.load_model(bare, LoadOptions(arch="test_vit_relpos", model_args={"img_size": 64}))
    assert str(bare) in str(e.value)


def test_options_given_win_over_the_record_and_timms_rewrite_key_by_key(tmp_path):
    import repair
    from repair.adapters import LoadOptions

    rec = {"input_size": [3, 48, 48], "mean": [0.4] * 3, "std": [0.3] * 3, "crop_pct": 1.0}
    a = repair.load_model(_bare(tmp_path, "test_resnet", rec), LoadOptions(arch="test_resnet", image_size=48))
    assert list(a.data_config["mean"]) == pytest.approx([0.4] * 3)          # the record's, not the architecture's
    b = repair.load_model(_bare(tmp_path, "test_vit_relpos", None, img_size=64),
                          LoadOptions(arch="test_vit_relpos", model_args={"img_size": 64}, image_size=96,
                                      class_names=["a", "b", "c"]))
    assert tuple(b.data_config["input_size"]) == (3, 96, 96)                 # asked: fed so (then refused by the net)


def test_a_folder_without_input_size_is_sized_as_timm_sizes_it(tmp_path):
    import timm
    from timm.models import save_for_hf

    import repair

    torch.manual_seed(0)
    m = timm.create_model("test_vit_relpos", pretrained=False, num_classes=3, img_size=64)
    f = tmp_path / "f"
    save_for_hf(m, str(f), model_args={"img_size": 64}, safe_serialization=True)
    cfg = json.loads((f / "config.json").read_text())
    cfg["pretrained_cfg"].pop("input_size", None)
    cfg["pretrained_cfg"]["fixed_input_size"] = True
    (f / "config.json").write_text(json.dumps(cfg))
    want = timm.data.resolve_data_config({}, model=timm.create_model(f"local-dir:{f}", pretrained=True))
    assert tuple(repair.load_model(f).data_config["input_size"]) == tuple(want["input_size"]) == (3, 64, 64)


def test_options_replace_a_bad_record_and_keep_the_networks_channels(tmp_path):
    """(second review) a value the options replace is not refused, nor the option blamed for the file's; an
    --image-size keeps the channels timm gives the network (in_chans 1 is refused as before, not fed RGB)."""
    import repair
    from repair.adapters import LoadOptions

    bad = _bare(tmp_path, "test_resnet", {**WHOLE, "input_size": [3, 5000, 5000], "mean": ["0.5"] * 3})
    a = repair.load_model(bad, LoadOptions(arch="test_resnet", image_size=64, mean=[0.5, 0.5, 0.5]))
    assert tuple(a.data_config["input_size"]) == (3, 64, 64)
    with pytest.raises(BadInput, match="mean must be one or three numbers") as e:
        repair.load_model(bad, LoadOptions(arch="test_resnet", image_size=64))
    assert str(bad) in str(e.value)
    grey = tmp_path / "g"
    grey.mkdir()
    one = _bare(grey, "test_resnet", None, in_chans=1)
    with pytest.raises(BadInput, match="^" + re.escape(str(one)) + ": input_size 1x32x32 has 1 channel"):
        repair.load_model(one, LoadOptions(arch="test_resnet", model_args={"in_chans": 1}, image_size=32,
                                           class_names=["a", "b", "c"]))
