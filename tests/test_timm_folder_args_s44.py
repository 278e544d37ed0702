"""timm folders as timm itself writes them: ``save_for_hf`` records ``img_size`` as a list, which the
architectures that annotate it ``int`` take through ``to_2tuple`` (a CaiT folder was refused), and a head
that is not an ``nn.Linear`` (LeViT's NormLinear) is named as such, not as a missing head tensor."""
from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models import save_for_hf  # noqa: E402

from repair.adapters import load_model  # noqa: E402
from repair.errors import BadInput  # noqa: E402

DATA_CONFIG = {"input_size": (3, 32, 32), "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.25,) * 3}


def _folder(tmp_path, arch, **kwargs):
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, num_classes=3, **kwargs).eval()
    folder = tmp_path / arch
    save_for_hf(m, str(folder), model_config={"label_names": ["cat", "dog", "fox"]}, safe_serialization=True,
                data_config=DATA_CONFIG)
    return m, folder


def test_a_folder_whose_model_args_hold_img_size_as_a_list_loads_as_timm_builds_it(tmp_path):
    m, folder = _folder(tmp_path, "cait_xxs24_224", img_size=32, depth=2)
    assert json.loads((folder / "config.json").read_text())["model_args"]["img_size"] == [32, 32]
    a = load_model(folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.model(x), m(x))
    assert a.build["model_args"]["img_size"] == [32, 32]


def test_a_size_of_the_wrong_kind_is_still_refused_naming_the_file(tmp_path):
    _, folder = _folder(tmp_path, "cait_xxs24_224", img_size=32, depth=2)
    cfg = json.loads((folder / "config.json").read_text())
    for bad in ("x", ["x", "y"], [True, True], []):
        cfg["model_args"]["img_size"] = bad
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(BadInput) as e:
            load_model(folder)
        # by the constructor or by the kind check: either way before any forward pass, naming the file
        assert "config.json" in str(e.value) and "cait_xxs24_224" in str(e.value), (bad, str(e.value))


def test_a_head_that_is_not_a_linear_layer_is_named_by_its_kind(tmp_path):
    _, folder = _folder(tmp_path, "levit_128s", img_size=32, distilled=False)
    with pytest.raises(BadInput) as e:
        load_model(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and "NormLinear, not nn.Linear" in msg and "no head tensor" not in msg


def test_a_list_for_a_number_that_is_not_a_size_is_refused_naming_the_argument(tmp_path):
    """(the session's review) only sizes take a list: ``drop_rate: [0.1]``, which the architecture builds
    with and fails on only in the forward pass, is refused by the kind check naming it, as before."""
    from conftest import make_timm_folder

    folder = make_timm_folder(tmp_path / "t")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"] = {"drop_rate": [0.1]}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput) as e:
        load_model(folder)
    assert "config.json" in str(e.value) and "drop_rate=[0.1]" in str(e.value) and "float" in str(e.value)
