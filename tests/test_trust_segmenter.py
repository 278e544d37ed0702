"""`--segmenter FOLDER` (recompose's CLIPSeg masks) loads only the folder's own safetensors: found by
an audit, a pickle ``pytorch_model.bin`` was loaded without being asked for, even through a symlink
leading out of the folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from test_recompose import tiny_clip_tokenizer


def _clipseg(folder: Path):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    tok = tiny_clip_tokenizer(folder)
    torch.manual_seed(0)
    cfg = CLIPSegConfig(text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16, extract_layers=[0], reduce_dim=8, decoder_num_attention_heads=2,
                        decoder_intermediate_size=16)
    model = CLIPSegForImageSegmentation(cfg)
    model.save_pretrained(str(folder))
    CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok) \
        .save_pretrained(str(folder))
    return model


def test_a_segmenter_is_loaded_only_from_its_own_safetensors(tmp_path):
    from repair.errors import BadInput
    from repair.modelrepair.masks import clipseg_masks

    pix = torch.rand(2, 3, 32, 32)
    good = tmp_path / "clipseg"
    model = _clipseg(good)
    m = clipseg_masks(good, pix, ["a square", "a ring"], "cpu")
    assert m.shape == (2, 1, 32, 32)

    pickled = tmp_path / "pickled"
    _clipseg(pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(BadInput) as e:
        clipseg_masks(pickled, pix, ["a square", "a ring"], "cpu")
    assert e.value.path == str(pickled) and "no .safetensors" in e.value.problem

    linked = tmp_path / "linked"
    _clipseg(linked)
    (tmp_path / "elsewhere").mkdir()
    os.replace(linked / "model.safetensors", tmp_path / "elsewhere" / "model.safetensors")
    (linked / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    with pytest.raises(BadInput) as e:
        clipseg_masks(linked, pix, ["a square", "a ring"], "cpu")
    assert e.value.path == str(linked / "model.safetensors") and "outside" in e.value.problem
