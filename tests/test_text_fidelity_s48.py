"""Session 48 (transformers text audit):

- a tokenizer without a pad token was an internal error (exit 3) on the first batch: now bad input
  naming the folder (an export without data, which reads no text, still works);
- a tokenizer that pads on the left, or gives no ``attention_mask``, made every figure change with
  ``--batch-size`` (padding shifted positions or was read as tokens), and ``fix --export onnx`` of such a
  model failed its verification: texts are now padded on the right with a mask, each read as alone;
- a text the tokenizer reads as no tokens at all failed or was read as padding depending on the batch:
  now bad input naming its row;
- a read-only model folder (git-annex, DVC: files 0444) failed ``fix`` when its tokenizer_config.json or
  config.json had to be updated in the copy.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import make_bert_folder
from repair.errors import BadInput

TEXTS = ["great", "the movie was not great at all", "awful plot", "a fun movie is a fun plot was great",
         "not awful", "the plot"]


@pytest.fixture(scope="module")
def bert_src(tmp_path_factory):
    return make_bert_folder(tmp_path_factory.mktemp("tf") / "bert")


def _edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    p = dst / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))
    return dst


def test_a_tokenizer_without_a_pad_token_is_refused_naming_the_folder(bert_src, tmp_path):
    import repair

    m = _edited(bert_src, tmp_path / "m", pad_token=None)
    a = repair.load_model(m)            # loaded: an export without data reads no text (review)
    with pytest.raises(BadInput, match="no pad token") as e:
        a.collate(["great"])
    assert str(m) in str(e.value)
    repair.export_model(m, tmp_path / "out", format="safetensors")


@pytest.mark.parametrize("changes", [{"padding_side": "left"}, {"model_input_names": ["input_ids"]},
                                     {"padding_side": "left", "model_input_names": ["input_ids", "token_type_ids"]}],
                         ids=["left", "no-mask", "left-no-mask"])
def test_a_text_reads_the_same_in_a_batch_as_alone(bert_src, tmp_path, changes):
    import repair

    a = repair.load_model(_edited(bert_src, tmp_path / "m", **changes))
    with a.inference():
        together = a.logits_batch(a.collate(TEXTS), torch.device("cpu"))
        alone = torch.cat([a.logits_batch(a.collate([t]), torch.device("cpu")) for t in TEXTS])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_an_export_of_a_model_whose_tokenizer_gives_no_mask_verifies(bert_src, tmp_path, text_data):
    import onnx

    import repair

    m = _edited(bert_src, tmp_path / "m", model_input_names=["input_ids"])
    rep = repair.export_model(m, tmp_path / "m.onnx", format="onnx", data=text_data)
    assert rep["passed"], rep
    assert [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input] == ["input_ids"]


def _no_special_tokens_folder(src: Path, dst: Path) -> Path:
    """The BERT folder with a word-level tokenizer that adds no special tokens (an empty text is no tokens)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(src, dst)
    vocab = {w: i for i, w in enumerate((src / "vocab.txt").read_text().split())}
    for f in dst.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            f.unlink()
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)      # drops format characters such as U+200B
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(dst))
    return dst


def test_a_text_read_as_no_tokens_is_refused_naming_its_row_whatever_the_batch(bert_src, tmp_path):
    import repair
    from repair.runtime import RuntimeOptions

    m = _no_special_tokens_folder(bert_src, tmp_path / "m")
    data = tmp_path / "d.csv"
    rows = [("great movie", "positive"), ("awful plot", "negative")] * 4 + [("\u200b", "positive")]
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    for bs in (1, 4, 64):
        with pytest.raises(BadInput, match="no tokens at all") as e:
            repair.evaluate(m, data, runtime=RuntimeOptions(batch_size=bs, use_cache=False))
        assert "row 9" in str(e.value) and str(data) in str(e.value)


def test_a_read_only_source_folder_is_copied_writable_for_its_owner(bert_src, tmp_path):
    from repair.adapters.base import copy_folder_except

    src = tmp_path / "ro"
    shutil.copytree(bert_src, src)
    for f in src.iterdir():
        os.chmod(f, 0o444)
    out = tmp_path / "out"
    copy_folder_except(src, out, src / "model.safetensors")
    for f in out.iterdir():
        assert os.stat(f).st_mode & stat.S_IWUSR, f
    assert oct(stat.S_IMODE(os.stat(src / "config.json").st_mode)) == oct(0o444)      # the input is as it was


def test_a_fixed_length_graphs_texts_are_padded_on_the_tokenizers_side(bert_src, tmp_path):
    """A graph of fixed sequence length is fed every text padded to that length whatever the batch: on the
    tokenizer's side, as a deployment feeding it pads (review: the first version padded right always)."""
    from repair.adapters.text import collate_texts, load_tokenizer

    tok = load_tokenizer(_edited(bert_src, tmp_path / "m", padding_side="left"), "x")
    fixed = collate_texts(tok, ["great", "the movie was not great at all"], 64, fixed_length=16)
    assert fixed["input_ids"].shape == (2, 16) and int(fixed["attention_mask"][0, 0]) == 0      # left
    want = tok(["great"], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert fixed["input_ids"][0].tolist() == want["input_ids"][0].tolist()
    longest = collate_texts(tok, ["great", "the movie was not great at all"], 64)
    assert int(longest["attention_mask"][0, 0]) == 1 and int(longest["attention_mask"][0, -1]) == 0    # right
