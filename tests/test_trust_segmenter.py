"""`--segmenter FOLDER` (recompose's CLIPSeg masks) loads only the folder's own safetensors: found by
an audit, a pickle ``pytorch_model.bin`` was loaded without being asked for, even through a symlink
leading out of the folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from test_recompose import tiny_clipseg


def test_a_segmenter_is_loaded_only_from_its_own_safetensors(tmp_path):
    from repair.errors import BadInput
    from repair.modelrepair.masks import clipseg_masks

    pix = torch.rand(2, 3, 32, 32)
    good = tmp_path / "clipseg"
    model = tiny_clipseg(good)
    m = clipseg_masks(good, pix, ["a square", "a ring"], "cpu")
    assert m.shape == (2, 1, 32, 32)

    pickled = tmp_path / "pickled"
    tiny_clipseg(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(BadInput) as e:
        clipseg_masks(pickled, pix, ["a square", "a ring"], "cpu")
    assert e.value.path == str(pickled) and "no .safetensors" in e.value.problem

    linked = tmp_path / "linked"
    tiny_clipseg(linked)
    (tmp_path / "elsewhere").mkdir()
    os.replace(linked / "model.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    (linked / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    with pytest.raises(BadInput) as e:
        clipseg_masks(linked, pix, ["a square", "a ring"], "cpu")
    assert e.value.path == str(linked / "model.safetensors") and "outside" in e.value.problem
