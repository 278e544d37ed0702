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


def test_a_model_cast_to_bfloat16_in_memory_is_not_the_files_model(tmp_path):
    """Found by the library audit: a loaded model cast in memory (`.to(torch.bfloat16)`) was taken for the
    float32 file's model: an evaluate after the file's embeddings were cached reported the file's figures
    and sha256 for weights that are not the file's. The lossy cast is a change, as an in-place edit is."""
    import repair
    from repair.errors import BadInput

    m = make_timm_folder(tmp_path / "m")
    d = make_images(tmp_path / "d", n_per_class=4, seed=1)
    repair.evaluate(m, d)                                # the file's embeddings cached
    model = repair.load_model(m)
    model.model.to(torch.bfloat16)
    changed = model.adopt_changes_in_place()
    assert changed and all(n in changed for n in ("fc.weight", "fc.bias")), changed
    try:
        rep = repair.evaluate(model, d)
    except BadInput:                                     # its forward pass on float32 inputs fails: said so
        return
    assert not rep["embedding"]["from_cache"] and rep["model"]["sha256"] != repair.evaluate(m, d)["model"]["sha256"]
