"""clp differentiates the network twice (its meta step, its saliency penalty): on a timm ViT torch's fused
attention has no double backward (an internal error, exit 3: session 44's model-repair audit), so clp's
steps run attention by the math kernel; an operator torch cannot differentiate twice within the scope given
(MobileNetV3's hard sigmoid, ``scope: all``) is exit 2 naming it and the setting."""
from __future__ import annotations

import json

import pytest
import torch
from test_clp import CLASSES, SIZE, _split
from typer.testing import CliRunner

from repair import threads
from repair_cli.main import app

runner = CliRunner()


def _folder(root, arch, **kw):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=2, **kw).eval()
    save_for_hf(model, str(root), model_config={"label_names": list(CLASSES)}, safe_serialization=True)
    cfg = json.loads((root / "config.json").read_text())
    cfg["pretrained_cfg"].update({"input_size": [3, SIZE, SIZE], "crop_pct": 1.0, "crop_mode": "center",
                                  "mean": [0.5] * 3, "std": [0.25] * 3})
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clparch")
    _split(root / "val", 48, None, seed=2, masks=root / "masks")
    return root


def _fix(model, data, out, recipe="clp"):
    with threads.limited(1):
        res = runner.invoke(app, [str(a) for a in ("fix", model, "--data", data / "val", "--recipe", recipe,
                                                   "--masks", data / "masks", "--group-by", "place", "--budget", "2steps", "--out", out,
                                                   "-q", "--no-cache")])
    return res.exit_code, res.stderr


def test_clp_runs_on_a_vision_transformer(data, tmp_path):
    vit = _folder(tmp_path / "vit", "vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=1, embed_dim=32,
                  num_heads=2)
    code, err = _fix(vit, data, tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_an_operator_without_a_second_derivative_in_scope_is_exit_2_naming_it(data, tmp_path):
    net = _folder(tmp_path / "mnv3", "mobilenetv3_small_050")
    recipe = tmp_path / "clp-all.yaml"
    recipe.write_text("name: clp-all\ncandidates:\n  - method: clp\n    params: {scope: all}\n")
    code, err = _fix(net, data, tmp_path / "out", recipe)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]       # (warnings on the small set)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "hardsigmoid" in lines[0] and "'all'" in lines[0] and "last:2" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_saliency_penalty_through_such_an_operator_is_exit_2_whatever_the_scope(data, tmp_path):
    """(the session's review) the penalty's input gradient runs through the whole network, and its second
    derivative is taken by the loop's backward, outside a step: the default scope, saliency on."""
    net = _folder(tmp_path / "mnv3", "mobilenetv3_small_050")
    recipe = tmp_path / "clp-sal.yaml"
    recipe.write_text("name: clp-sal\ncandidates:\n  - method: clp\n    params: {saliency_weight: 1.0}\n")
    code, err = _fix(net, data, tmp_path / "out", recipe)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "hardsigmoid" in lines[0] and "saliency_weight: 0" in lines[0] and "last:2" not in lines[0]
    assert not (tmp_path / "out").exists()
