"""The library run inside a caller's torch modes: a notebook's ``with torch.no_grad():`` or
``torch.inference_mode()`` around ``repair.fix`` (found by an audit: every model repair failed there with
"element 0 of tensors does not require grad", and clp's Grad-CAM found no feature map)."""
from __future__ import annotations

import torch

from conftest import make_images, make_timm_folder


def test_a_model_repair_runs_as_the_command_does_inside_a_callers_no_grad_or_inference_mode(tmp_path):
    from safetensors.torch import load_file

    import repair
    from repair.pipeline import FixOptions

    m = make_timm_folder(tmp_path / "m")
    d = make_images(tmp_path / "d", n_per_class=8, seed=1)
    opts = FixOptions(recipe="clp", seed=0, budget="3steps")
    plain = repair.fix(m, d, out=tmp_path / "plain", options=opts)
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    for mode in ("no_grad", "inference_mode"):
        with getattr(torch, mode)():
            inside = repair.fix(m, d, out=tmp_path / mode, options=opts)
            assert not torch.is_grad_enabled()                # the caller's mode is left as it was
        assert inside.report["kind"] == plain.report["kind"] == "model"
        b = load_file(str(tmp_path / mode / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mode
