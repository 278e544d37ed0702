"""Tests that kill mutants a session-50 audit found surviving: the embedding cache's refusals of an
entry that is not this run's (no input digests, another key's, other rows or digests), its keys (the
device, the pixel limit of the input-digest entry), the samples record (a text's bytes, its key length,
a damaged record), the recorded settings' refusals, and the data's fingerprint, subset, class indices
and split note."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_images
from repair.errors import BadInput


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("s50data") / "images", n_per_class=2, seed=5)


def _texts(items, labels=None):
    from repair.data import RepairData

    return RepairData(source=Path("t.csv"), modality="text", items=list(items),
                      labels=list(labels) if labels is not None else ["positive"] * len(items))


# ----------------------------------------------------------------- the embedding cache's entries
def test_an_image_entry_without_input_digests_is_recomputed_with_them(tmp_path, timm_folder, small_images, capsys):
    """An image entry must hold its input digests (the repair-set guard's keys); one that holds the
    embeddings alone is recomputed, not served with ``inputs=None``."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import _write_cache, extract

    a, d, cache = load_model(timm_folder), load_data(small_images), tmp_path / "c"
    first = extract(a, d, cache_dir=cache, device="cpu", progress=False)
    assert not first.from_cache and first.inputs is not None
    entry = cache / f"{first.key}.safetensors"
    _write_cache(entry, first.X, None)                # a sound entry of the embeddings alone
    capsys.readouterr()
    again = extract(a, d, cache_dir=cache, device="cpu", progress=False)
    assert again.from_cache is False
    assert again.inputs is not None and torch.equal(again.inputs, first.inputs)
    assert torch.equal(again.X, first.X)
    err = capsys.readouterr().err
    assert f"embedding cache entry {entry} was corrupt (holds ['embeddings']" in err
    third = extract(a, d, cache_dir=cache, device="cpu", progress=False)     # rewritten whole
    assert third.from_cache is True and torch.equal(third.inputs, first.inputs)


def test_an_entry_copied_to_another_keys_file_name_is_not_served(tmp_path, timm_folder, small_images, capsys):
    """An entry made with ``--batch-size 64`` copied to the file names of the ``--batch-size 8`` key
    is sound in itself, but was written for another key: recomputed, with the notice."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import cache_key, extract

    a, d, cache = load_model(timm_folder), load_data(small_images), tmp_path / "c"
    e64 = extract(a, d, cache_dir=cache, device="cpu", batch_size=64, progress=False)
    k8 = cache_key(a, d, torch.device("cpu"), 8)
    assert k8 != e64.key
    entry = cache / f"{k8}.safetensors"
    shutil.copyfile(cache / f"{e64.key}.safetensors", entry)
    capsys.readouterr()
    e8 = extract(a, d, cache_dir=cache, device="cpu", batch_size=8, progress=False)
    assert e8.from_cache is False and e8.key == k8
    assert f"embedding cache entry {entry} was corrupt (written for another key); recomputed" in capsys.readouterr().err


def test_a_text_entry_of_other_rows_is_recomputed(tmp_path, bert_folder):
    """A text entry may hold no input digests, so its row count is checked on the embeddings alone."""
    from repair.adapters import load_model
    from repair.embeddings import _read_cache, _write_cache, cache_key, extract

    a, d, cache = load_model(bert_folder), _texts(["good movie", "bad plot", "the plot was fun"]), tmp_path / "c"
    key = cache_key(a, d, torch.device("cpu"))
    entry = cache / f"{key}.safetensors"
    _write_cache(entry, torch.zeros((len(d) + 1, 32)), None)
    assert _read_cache(entry, key, len(d), with_inputs=None)[2] == "holds a float32 tensor of shape (4, 32), expected 3 rows"
    e = extract(a, d, cache_dir=cache, device="cpu", progress=False)
    assert e.from_cache is False and tuple(e.X.shape) == (3, 32)
    assert _read_cache(entry, key, len(d), with_inputs=None)[2] == ""             # rewritten whole


def test_an_entry_whose_input_digests_have_another_shape_is_recomputed(tmp_path, timm_folder, small_images, capsys):
    """Input digests of 8 bytes a row (their own digest matching) are not the (n, 16) the guard reads."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import _write_cache, extract

    a, d, cache = load_model(timm_folder), load_data(small_images), tmp_path / "c"
    first = extract(a, d, cache_dir=cache, device="cpu", progress=False)
    entry = cache / f"{first.key}.safetensors"
    _write_cache(entry, first.X, first.inputs[:, :8].contiguous())
    capsys.readouterr()
    again = extract(a, d, cache_dir=cache, device="cpu", progress=False)
    assert again.from_cache is False and torch.equal(again.inputs, first.inputs)
    assert "was corrupt (holds input digests of shape (6, 8), expected (6, 16))" in capsys.readouterr().err


def test_cache_keys_differ_on_cpu_cuda_and_mps(timm_folder, small_images):
    """The key is computed from the device's kind (no such device is needed): CUDA's and MPS's
    embeddings round differently from the CPU's and from each other's."""
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import cache_key

    a, d = load_model(timm_folder), load_data(small_images)
    keys = [cache_key(a, d, torch.device(kind)) for kind in ("cpu", "cuda", "mps")]
    assert len(set(keys)) == 3
    assert cache_key(a, d, None) == keys[0]


# ----------------------------------------------------------------- the input-digest cache entry
def test_an_input_digest_entry_of_one_digest_too_few_with_its_seal_is_recomputed(tmp_path, timm_folder,
                                                                                 small_images, capsys):
    from repair.adapters import load_model
    from repair.data import load_data
    from repair.embeddings import image_input_keys

    a, cache = load_model(timm_folder), tmp_path / "c"
    first = image_input_keys(a, load_data(small_images), cache)
    (entry,) = list(cache.glob("inputs-*.json"))
    doc = json.loads(entry.read_text())
    short = doc["digests"][:-1]
    entry.write_text(json.dumps({**doc, "digests": short,
                                 "sha256": hashlib.sha256("\n".join(short).encode()).hexdigest()}))
    capsys.readouterr()
    assert image_input_keys(a, load_data(small_images), cache) == first
    assert f"notice: input-digest cache entry {entry} was corrupt; recomputed" in capsys.readouterr().err
    assert json.loads(entry.read_text()) == doc


def test_an_input_digest_entry_is_not_served_under_a_lower_pixel_limit(tmp_path, timm_folder, small_images):
    """36 x 36 images (1,296 pixels) read under --max-pixels 1100: refused, though an entry made under
    the default limit holds their digests."""
    from repair.adapters import load_model
    from repair.data import DataOptions, load_data
    from repair.embeddings import image_input_keys

    a, cache = load_model(timm_folder), tmp_path / "c"
    assert len(image_input_keys(a, load_data(small_images), cache_dir=cache)) == 6
    low = load_data(small_images, DataOptions(max_pixels=1100))        # read: the limit is met on decoding
    with pytest.raises(BadInput, match="image is 36x36 = 1,296 pixels, more than the limit of 1,100"):
        image_input_keys(a, low, cache_dir=cache)


# ----------------------------------------------------------------- the samples record
def test_recorded_rows_checks_a_texts_bytes_against_the_record():
    """A text the record holds by its bytes is recorded, whatever keys the model reads it as now."""
    from repair import provenance as P

    t = SimpleNamespace(modality="text", content_hashes=lambda: ["t1", "t2"])
    rec = P.samples_record(t, ["k1", "k2"])
    assert P.recorded_rows(t, ["zz", "yy"], rec) == [True, True]
    assert P.recorded_rows(t, ["k1", "yy"], rec) == [True, True]
    other = SimpleNamespace(modality="text", content_hashes=lambda: ["t3", "t1"])
    assert P.recorded_rows(other, ["zz", "yy"], rec) == [False, True]


def test_a_texts_keys_without_the_embeddings_inputs_are_those_taken_from_them(bert_folder):
    from repair.adapters import load_model
    from repair.embeddings import text_input_digests
    from repair.provenance import sample_keys

    a, d = load_model(bert_folder), _texts(["Good movie", "bad plot"])
    from_inputs = sample_keys(d, text_input_digests(a, d), a)
    assert [len(k) for k in from_inputs] == [32, 32]
    assert sample_keys(d, None, a) == from_inputs


def test_a_samples_record_of_a_length_not_a_multiple_of_8_knows_nothing():
    from repair import provenance as P

    bad = P.SAMPLES_SCHEME + base64.b64encode(bytes(12)).decode()
    assert P.in_samples_record(["a"], bad) is None
    t = SimpleNamespace(modality="text", content_hashes=lambda: ["t1"])
    assert P.recorded_rows(t, ["a"], bad) is None


# ----------------------------------------------------------------- the recorded settings
@pytest.mark.parametrize("raw, why", [
    (json.dumps({"preprocess": {"max_length": 0}}), "preprocess.max_length is not a whole number >= 1: 0"),
    (json.dumps({"preprocess": {"max_length": -1}}), "preprocess.max_length is not a whole number >= 1: -1"),
    (json.dumps({"preprocess": {"max_length": True}}), "preprocess.max_length is not a whole number >= 1: true"),
    (json.dumps({"classes": []}), r"classes is not a list of names: \[\]"),
])
def test_a_settings_record_of_a_bad_length_or_no_classes_is_refused(raw, why):
    from repair import provenance

    with pytest.raises(BadInput, match=why) as e:
        provenance.recorded_settings({"repair.settings": raw}, Path("m.safetensors"))
    assert str(e.value.path) == "m.safetensors"
    assert provenance.recorded_settings({"repair.settings": json.dumps({"preprocess": {"max_length": 1}})}) == \
        {"preprocess": {"max_length": 1}}


# ----------------------------------------------------------------- the data
def test_a_label_one_past_the_last_class_index_is_refused():
    from repair.data import label_indices

    assert label_indices(["0", "2"], ["a", "b", "c"]) == [0, 2]
    with pytest.raises(BadInput, match="label '3' is not a class of the model"):
        label_indices(["0", "3"], ["a", "b", "c"])


def test_texts_split_at_another_place_have_other_fingerprints():
    assert _texts(["ab", "c"]).fingerprint() != _texts(["a", "bc"]).fingerprint()
    assert _texts(["ab", "c"]).fingerprint() == _texts(["ab", "c"]).fingerprint()


def test_a_subset_has_its_own_rows_content_hashes():
    d = _texts(["one", "two"])
    h = d.content_hashes()
    sub = d.subset([1, 0])
    assert sub.content_hashes() == [h[1], h[0]] == [hashlib.sha256(t.encode()).hexdigest() for t in ("two", "one")]


def test_a_split_column_of_two_values_is_noted():
    from repair.data import several_splits

    notes = several_splits(Path("t.csv"), {"split": ["train", "test", "train"]})
    assert len(notes) == 1 and "t.csv: its column 'split' holds 2 values ('test', 'train')" in notes[0]
    assert several_splits(Path("t.csv"), {"split": ["train", "train"]}) == []
