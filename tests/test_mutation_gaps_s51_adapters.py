"""Session 51 (mutation audit of the model adapters: timm, transformers, bare torch files, images, texts):
one test per surviving mutant, each a behaviour no earlier test pinned.

- a bfloat16 checkpoint's head set by ``set_head`` is rounded to bfloat16 in memory (the model measured is the
  one written) and written back as bfloat16;
- ``set_head`` refuses a NaN bias and a bias of the wrong length as BadInput (never a later RepairError);
- a bare weights file with a tensor missing, or of another shape than the architecture's, is BadInput naming it;
- a factory module whose forward does more after its head (another output shape) is BadInput;
- ``--model-args`` win over the folder's own ``model_args``; ``--arch`` that disagrees with a folder is refused;
- a bare file given ``--image-size`` is read without a crop (``crop_pct`` 1.0), not the architecture's 0.95;
- a folder built for any size (``dynamic_img_size``) or a non-square ``img_size`` is fed as plain timm feeds it;
- RoBERTa's position table (offset by its padding index) truncates at 64 of 66 rows; the 512 cap holds;
- images are collated as float32 under a float64 default dtype.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CLASSES, WORDS, factory_weights, make_timm_folder
from repair.adapters import LoadOptions
from repair.errors import BadInput
from test_library_inputs import float64_default


@pytest.fixture(scope="module")
def timm_src(tmp_path_factory):
    return make_timm_folder(tmp_path_factory.mktemp("s51ad") / "m")


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    from conftest import make_images

    return make_images(tmp_path_factory.mktemp("s51img") / "d", n_per_class=1, size=40, with_metadata=False)


def _paths(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bf16_folder(src: Path, dst: Path) -> Path:
    m = _copy(src, dst)
    t = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
         for k, v in load_file(str(m / "model.safetensors")).items()}
    save_file(t, str(m / "model.safetensors"))
    return m


def _bare_resnet(path: Path, seed: int = 0, **kwargs) -> tuple[Path, dict]:
    import timm

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=3, **kwargs).state_dict().items()}
    save_file(sd, str(path))
    return path, sd


# ---- gaps 6, 7: a bfloat16 checkpoint's new head ---------------------------------------------------------

def _bf16_new_head(timm_src, tmp_path):
    import repair

    a = repair.load_model(_bf16_folder(timm_src, tmp_path / "m"))
    W, b = a.head_params()
    g = torch.Generator().manual_seed(0)
    a.set_head(W + 1e-3 * torch.randn(W.shape, generator=g), b + 0.1234567)
    own = {k: v.detach().clone() for k, v in a.model.state_dict().items()}
    out = tmp_path / "o"
    a.save(out, {})
    return a, own, load_file(str(out / "model.safetensors"))


def test_gap6_a_new_head_on_a_bf16_file_is_rounded_in_memory_as_it_is_written(timm_src, tmp_path):
    a, own, written = _bf16_new_head(timm_src, tmp_path)
    for k in (f"{a.head_name}.weight", f"{a.head_name}.bias"):
        assert torch.equal(own[k].double(), written[k].double()), k


def test_gap7_a_new_head_on_a_bf16_file_is_written_as_bf16(timm_src, tmp_path):
    a, _, written = _bf16_new_head(timm_src, tmp_path)
    assert written[f"{a.head_name}.weight"].dtype == torch.bfloat16
    assert written[f"{a.head_name}.bias"].dtype == torch.bfloat16


# ---- gaps 8, 9: set_head's checks ------------------------------------------------------------------------

def test_gap8_a_nan_bias_is_refused(timm_folder):
    import repair

    a = repair.load_model(timm_folder)
    W, b = a.head_params()
    with pytest.raises(BadInput, match="set_head: the new head holds NaN or infinite values"):
        a.set_head(W, torch.full_like(b, math.nan))
    assert not a.head_changed


def test_gap9_a_bias_of_the_wrong_length_is_bad_input(timm_folder):
    import repair

    a = repair.load_model(timm_folder)
    W, b = a.head_params()
    with pytest.raises(BadInput, match=r"set_head: the new head has shape \(3, \d+\) / \(4,\), the model's is "
                                       r"\(3, \d+\) / \(3,\)"):
        a.set_head(W, torch.zeros(b.numel() + 1))
    assert not a.head_changed


# ---- gaps 10, 11: a bare file's tensors against the architecture -----------------------------------------

def test_gap10_a_bare_file_with_a_tensor_missing_is_bad_input(tmp_path):
    import repair

    f, sd = _bare_resnet(tmp_path / "w.safetensors")
    del sd["conv1.0.weight"]
    save_file(sd, str(f))
    with pytest.raises(BadInput, match=r"weights do not match the architecture: 1 weight\(s\) missing "
                                       r"\(e\.g\. conv1\.0\.weight\) \(built with other arguments\? "
                                       r"pass them with --model-args\)"):
        repair.load_model(f, LoadOptions(arch="test_resnet", image_size=32, class_names=CLASSES))


def test_gap11_a_bare_file_with_tensors_of_other_shapes_is_bad_input(tmp_path):
    import repair

    f, sd = _bare_resnet(tmp_path / "w.safetensors", channels=(32, 48, 48, 128))
    with pytest.raises(BadInput, match=r"tensor \S+ has shape \(\d+(, \d+)*\), the architecture expects "
                                       r"\(\d+(, \d+)*\) \(built with other arguments\?"):
        repair.load_model(f, LoadOptions(arch="test_resnet", image_size=32, class_names=CLASSES))


# ---- gap 12: a factory module whose output is not its head's ---------------------------------------------

FACTORY_SRC = '''
import torch.nn as nn

class Cut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)
    def forward(self, x):
        return self.head(self.body(x))[:, :2]

def build():
    return Cut()
'''


def test_gap12_a_forward_that_cuts_the_heads_output_is_bad_input(tmp_path, monkeypatch, few_images):
    import repair

    w = factory_weights(tmp_path, "cut_s51", FACTORY_SRC, monkeypatch)
    a = repair.load_model(w, LoadOptions(factory="cut_s51:build", image_size=32, class_names=CLASSES))
    batch = a.collate(_paths(few_images))
    with pytest.raises(BadInput, match=r"the model's output has shape \(3, 2\), its head head's \(3, 3\): "
                                       r"the forward does more after the head") as e:
        a.embed_batch(batch, torch.device("cpu"))
    assert str(w) in str(e.value)


# ---- gaps 1, 3: a folder and the options ------------------------------------------------------------------

def test_gap1_model_args_given_win_over_the_folders(timm_src, tmp_path):
    import timm

    import repair

    m = _copy(timm_src, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_args"] = {"act_layer": "relu"}
    (m / "config.json").write_text(json.dumps(cfg))
    a = repair.load_model(m, LoadOptions(model_args={"act_layer": "gelu"}))
    assert a.build["model_args"]["act_layer"] == "gelu"
    ref = timm.create_model("test_resnet", num_classes=3, act_layer="gelu").eval()
    ref.load_state_dict(load_file(str(m / "model.safetensors")))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(a.model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert a.config_updates["model_args"] == {"act_layer": "gelu"}


def test_gap3_an_arch_that_disagrees_with_the_folder_is_refused(timm_folder):
    import repair

    with pytest.raises(BadInput, match="--arch resnet18 disagrees with the folder's architecture 'test_resnet'") as e:
        repair.load_model(timm_folder, LoadOptions(arch="resnet18"))
    assert str(timm_folder / "config.json") in str(e.value)


# ---- gap 2: a bare file's --image-size ---------------------------------------------------------------------

def test_gap2_a_bare_file_given_an_image_size_is_not_cropped(tmp_path):
    import repair

    f, _ = _bare_resnet(tmp_path / "w.safetensors")
    a = repair.load_model(f, LoadOptions(arch="test_resnet", image_size=32, class_names=CLASSES))
    assert a.data_config["crop_pct"] == 1.0
    assert list(a.data_config["input_size"]) == [3, 32, 32]


# ---- gap 16: float64 default dtype -------------------------------------------------------------------------

def test_gap16_images_are_collated_as_float32_under_a_float64_default(timm_folder, few_images):
    import repair

    with float64_default():
        a = repair.load_model(timm_folder)
        batch = a.collate(_paths(few_images))
        assert batch.dtype == torch.float32
        emb = a.embed_batch(batch, torch.device("cpu"))
    assert emb.shape[0] == len(_paths(few_images))


# ---- gap 15: the 512 cap -----------------------------------------------------------------------------------

def test_gap15_the_truncation_is_at_most_512_tokens():
    from types import SimpleNamespace

    from repair.adapters.text import resolve_max_length

    assert resolve_max_length(SimpleNamespace(model_max_length=1024), None, positions=2048) == 512
    assert resolve_max_length(SimpleNamespace(model_max_length=1024), None, positions=300) == 300


# ---- gaps 4, 5: a timm ViT folder's input size ----------------------------------------------------------

def _vit_with(path: Path, model_args: dict, pretrained_cfg: dict) -> Path:
    """A ``test_vit`` folder built with ``model_args`` whose ``pretrained_cfg`` says ``pretrained_cfg`` (as an older
    timm wrote it; as ``test_image_preprocess_s48._vit_folder`` builds its one)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    m = timm.create_model("test_vit", pretrained=False, num_classes=3, **model_args)
    save_for_hf(m, str(path), model_config={"label_names": list(CLASSES)}, safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["pretrained_cfg"].update(pretrained_cfg)
    cfg["model_args"] = dict(model_args)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _plain_input_size(f: Path) -> list:
    import timm

    plain = timm.create_model(f"local-dir:{f}", pretrained=True)
    return list(timm.data.resolve_data_config({}, model=plain)["input_size"])


def test_gap4_a_vit_built_for_any_size_is_fed_at_its_configured_size(tmp_path):
    import repair

    f = _vit_with(tmp_path / "vit", {"img_size": 64, "dynamic_img_size": True},
                  {"input_size": [3, 32, 32], "fixed_input_size": True, "crop_pct": 1.0})
    want = _plain_input_size(f)
    assert want == [3, 32, 32]
    assert list(repair.load_model(f).data_config["input_size"]) == want


def test_gap5_a_non_square_img_size_is_height_then_width(tmp_path, few_images):
    import repair

    f = _vit_with(tmp_path / "vit", {"img_size": [32, 48]},
                  {"input_size": [3, 160, 160], "fixed_input_size": True, "crop_pct": 1.0})
    want = _plain_input_size(f)
    assert want == [3, 32, 48]
    a = repair.load_model(f)
    assert list(a.data_config["input_size"]) == want
    batch = a.collate(_paths(few_images)[:2])
    assert tuple(batch.shape) == (2, 3, 32, 48)
    assert a.embed_batch(batch, torch.device("cpu")).shape[0] == 2


# ---- gap 14: RoBERTa's position offset --------------------------------------------------------------------

def test_gap14_a_roberta_folder_truncates_within_its_position_table(tmp_path):
    from transformers import BertTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    import repair

    d = tmp_path / "rob"
    d.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)   # no length limit
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, pad_token_id=1, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = RobertaForSequenceClassification(cfg).eval()
    assert model.roberta.embeddings.position_embeddings.num_embeddings == 66
    model.save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    assert tok.model_max_length > 10**6
    a = repair.load_model(d)
    assert a.max_length == 64
