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


def test_segmenter_and_generator_folders_are_checked_when_the_command_starts(tmp_path):
    """The resources' own checks (run by ``repair fix`` and a zoo row before any work, as the prompts
    file's): a segmenter without safetensors and a generator folder with a symlink leading out are
    refused there, not once the masks or the generation are reached after the embeddings."""
    from repair.errors import BadInput
    from repair.modelrepair.generation import GENERATOR_MODEL
    from repair.modelrepair.masks import SEGMENTER

    seg = tmp_path / "seg"
    seg.mkdir()
    (seg / "config.json").write_text("{}")
    (seg / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BadInput) as e:
        SEGMENTER.check(seg)
    assert e.value.path == str(seg) and "no .safetensors" in e.value.problem
    (seg / "model.safetensors").write_bytes(b"x")
    assert SEGMENTER.check(seg) == seg

    gen = tmp_path / "gen"
    (gen / "unet").mkdir(parents=True)
    (gen / "model_index.json").write_text("{}")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (gen / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(BadInput) as e:
        GENERATOR_MODEL.check(gen)
    assert e.value.path == str(gen / "unet" / "diffusion_pytorch_model.safetensors") and "outside" in e.value.problem
    (gen / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (gen / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    assert GENERATOR_MODEL.check(gen) == gen
