"""The library run inside a caller's torch modes: a notebook's ``with torch.no_grad():`` or
``torch.inference_mode()`` around ``repair.fix`` (found by an audit: every model repair failed there with
"element 0 of tensors does not require grad", and clp's Grad-CAM found no feature map)."""
from __future__ import annotations

import pytest
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


def test_a_model_cast_to_bfloat16_in_memory_is_refused_not_taken_for_the_files_model(tmp_path):
    """Found by the library audit: a loaded model cast in memory (`.to(torch.bfloat16)`) was taken for the
    float32 file's model: an evaluate after the file's embeddings were cached reported the file's figures
    and sha256 for weights that are not the file's -- also (found by the review) when every value survives
    the cast (a float32 file of bfloat16-trained weights). A cast after loading is refused, whatever the
    cache holds, naming a tensor and both dtypes."""
    from safetensors.torch import load_file, save_file

    import repair
    from repair.errors import BadInput

    m = make_timm_folder(tmp_path / "m")
    d = make_images(tmp_path / "d", n_per_class=4, seed=1)
    exact = tmp_path / "exact"                                   # every value a bfloat16 value
    exact.mkdir()
    for f in m.iterdir():
        (exact / f.name).write_bytes(f.read_bytes())
    t = load_file(str(m / "model.safetensors"))
    save_file({k: (v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v) for k, v in t.items()},
              str(exact / "model.safetensors"))
    for folder in (m, exact):
        repair.evaluate(folder, d)                               # the file's embeddings cached
        model = repair.load_model(folder)
        model.model.to(torch.bfloat16)
        for call in (lambda: repair.evaluate(model, d), lambda: repair.probe(model, d), model.adopt_changes_in_place):
            with pytest.raises(BadInput, match="cast after it was loaded .*bfloat16, loaded as float32"):
                call()
        model.model.to(torch.float32)                            # cast back: its values are what it holds now
        rep = repair.evaluate(model, d)
        if folder == exact:                                      # every value kept: the file's model again
            assert rep["embedding"]["from_cache"] and rep["model"]["sha256"]
        else:                                                    # values rounded: changed, measured anew
            assert not rep["embedding"]["from_cache"] and rep["model"]["sha256"] is None
            assert "fc.weight" in rep["model"]["changed_tensors"]
