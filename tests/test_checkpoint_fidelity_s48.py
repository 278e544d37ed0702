"""Session 48 (checkpoint fidelity audit): what is written is the user's model, loadable by plain tools,
behaving as the tool says.

- a timm folder whose ``model_args.num_classes`` disagrees with its ``num_classes`` (or, without one, with
  ``pretrained_cfg.num_classes``) is refused: plain timm builds its head from another count than the one
  measured and drops (or refuses) the file's head;
- a float64 checkpoint whose values float32 cannot hold is refused naming that, not as "the weights file
  changed while it was read";
- a checkpoint without BatchNorm's ``num_batches_tracked`` (torch's strict load and timm fill it) is read,
  and written back without it;
- a model changed in place in float32 from a bfloat16 file is rounded as ``set_tensors`` rounds: the model
  measured is the one written;
- a sharded checkpoint's index is left out of a repaired folder with its shards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_timm_folder
from repair.errors import BadInput


@pytest.fixture(scope="module")
def timm_src(tmp_path_factory):
    return make_timm_folder(tmp_path_factory.mktemp("fid") / "m")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_timm_folder_whose_class_counts_disagree_is_refused(timm_src, tmp_path):
    import repair

    m = _copy(timm_src, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg.setdefault("model_args", {})["num_classes"] = 4    # the weights' head and num_classes say 3
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="class counts disagree") as e:
        repair.load_model(m)
    assert str(m / "config.json") in str(e.value)


def test_a_pretrained_cfg_count_is_the_count_only_without_a_top_level_one(timm_src, tmp_path):
    """An older timm kept the source's pretrained_cfg.num_classes (1000) beside the top-level count: timm
    reads the top-level one (review); alone, pretrained_cfg's count is the one timm builds with."""
    import repair

    m = _copy(timm_src, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["pretrained_cfg"]["num_classes"] = 1000
    (m / "config.json").write_text(json.dumps(cfg))
    assert repair.load_model(m).head.weight.shape[0] == 3
    del cfg["num_classes"]
    cfg["pretrained_cfg"]["num_classes"] = 4
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match=r"pretrained_cfg\.num_classes 4, model_args\.num_classes 3"):
        repair.load_model(m)


def test_a_timm_folder_whose_class_counts_agree_loads(timm_src, tmp_path):
    import repair

    m = _copy(timm_src, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg.setdefault("model_args", {})["num_classes"] = 3
    cfg["pretrained_cfg"]["num_classes"] = 3
    (m / "config.json").write_text(json.dumps(cfg))
    assert repair.load_model(m).head.weight.shape[0] == 3


def test_a_float64_checkpoint_float32_cannot_hold_is_refused_naming_that(timm_src, tmp_path):
    import repair

    m = _copy(timm_src, tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    t = {k: (v.double() + 1e-12 * torch.randn(v.shape, generator=g, dtype=torch.float64)) if v.is_floating_point()
         else v for k, v in load_file(str(m / "model.safetensors")).items()}
    save_file(t, str(m / "model.safetensors"))
    with pytest.raises(BadInput, match="stored as float64 with values the model's float32 cannot hold") as e:
        repair.load_model(m)
    assert "changed while it was read" not in str(e.value) and "did not load" not in str(e.value)
    # float64 values float32 holds exactly are read as they are
    t = {k: v.double() if v.is_floating_point() else v for k, v in load_file(str(timm_src / "model.safetensors")).items()}
    save_file(t, str(m / "model.safetensors"))
    repair.load_model(m)


def test_a_checkpoint_without_batchnorm_batch_counts_is_read_and_written_without_them(timm_src, tmp_path):
    import timm

    import repair

    m = _copy(timm_src, tmp_path / "m")
    t = {k: v for k, v in load_file(str(m / "model.safetensors")).items() if not k.endswith("num_batches_tracked")}
    save_file(t, str(m / "model.safetensors"))
    a = repair.load_model(m)
    counts = [k for k in a.model.state_dict() if k.endswith("num_batches_tracked")]
    assert counts
    # a model repair that trained BatchNorm sets every count: kept out of what is written
    a.set_tensors({counts[0]: torch.tensor(7)})
    W, b = a.head_params()
    a.set_head(W * 0.5, b)
    out = tmp_path / "o"
    a.save(out, {})
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(t)
    assert torch.equal(written[f"{a.head_name}.weight"], (W * 0.5).to(written[f"{a.head_name}.weight"].dtype))
    timm.create_model(f"local-dir:{out}", pretrained=True)          # plain timm loads it


def test_an_in_place_change_is_rounded_as_the_file_stores_it(timm_src, tmp_path):
    import repair

    m = _copy(timm_src, tmp_path / "m")
    t = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(m / "model.safetensors")).items()}
    save_file(t, str(m / "model.safetensors"))
    a = repair.load_model(m)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in a.model.parameters():
            if p.dim() > 1:
                p.add_(2e-3 * torch.randn_like(p))
    assert a.adopt_changes_in_place()
    own = a.model.state_dict()
    out = tmp_path / "o"
    a.save(out, {})
    written = load_file(str(out / "model.safetensors"))
    differ = [k for k in own if k in written and not torch.equal(own[k].double(), written[k].double())]
    assert differ == []


def test_a_sharded_checkpoints_index_is_left_out_with_its_shards():
    from repair.rules import source_weights_copy

    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json", "Model.SafeTensors.Index.JSON"):
        assert source_weights_copy(Path(name)), name
    for name in ("tokenizer.json", "config.json", "index.json", "special_tokens_map.json"):
        assert not source_weights_copy(Path(name)), name
