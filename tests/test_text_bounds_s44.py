"""Text sets far larger than tests use (session 44's large-input audit): a text's input key is computed a
chunk of texts at a time (one tokenizer call over the whole set held every encoding, with its truncated
tokens: ~114 KB a long text), and a text whose cut holds few tokens (one huge word, blanks) is read from
at most ``MAX_CHARS_READ`` characters, not whole (a 30 MB field: 103 s, 3.2 GB)."""
from __future__ import annotations

import hashlib
import json
import time

import pytest
from conftest import make_bert_folder

from repair.adapters import base, load_model, text


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return load_model(make_bert_folder(tmp_path_factory.mktemp("b") / "bert"))


def test_input_keys_tokenize_a_chunk_at_a_time_and_equal_one_text_at_a_time(bert, monkeypatch):
    texts = [f"the movie {'was great ' * (i % 7)} plot {i}" for i in range(2 * base.KEY_CHUNK + 5)]
    sizes = []
    real = text.tokenize_texts

    def counting(tok, items, length, **kw):
        sizes.append(len(items))
        return real(tok, items, length, **kw)

    monkeypatch.setattr(text, "tokenize_texts", counting)
    keys = bert.input_keys(texts)
    assert max(sizes) <= base.KEY_CHUNK and sum(sizes) == len(texts)
    length = bert.max_length
    one = [hashlib.sha256(json.dumps([int(t) for t in real(bert.tokenizer, [x], length)["input_ids"][0]]).encode()).hexdigest()
           for x in texts]
    assert keys == one


@pytest.mark.parametrize("kind", ["one word", "blanks then words"])
def test_a_field_with_few_tokens_per_character_is_read_from_a_bounded_cut(bert, kind):
    n = 4 * text.MAX_CHARS_READ
    t = "x" * n if kind == "one word" else " " * n + " the movie was great"
    t0 = time.perf_counter()
    (cut,) = text.bounded_texts(bert.tokenizer, [t], bert.max_length)
    assert len(cut) == text.MAX_CHARS_READ and t.startswith(cut)
    # one huge word is one unknown token whatever its length: the cut reads as the whole text does
    if kind == "one word":
        ids = text.tokenize_texts(bert.tokenizer, [t], bert.max_length)["input_ids"][0]
        assert ids == bert.tokenizer(t[:10_000], truncation=True, max_length=bert.max_length)["input_ids"]
    assert time.perf_counter() - t0 < 120          # (a hang guard, not a timing target)


def test_a_short_text_and_a_long_text_with_many_tokens_are_cut_as_before(bert):
    short = "the movie was great"
    long = "the movie was great " * 10_000
    a, b = text.bounded_texts(bert.tokenizer, [short, long], bert.max_length)
    assert a == short and len(b) == max(text.MIN_CHARS_KEPT, text.CHARS_PER_TOKEN * bert.max_length)


def test_a_warm_text_run_reads_its_input_digests_from_the_cache(bert, tmp_path, monkeypatch):
    """(session 44's large-input audit) a cache hit re-tokenized the whole text set to hash its samples
    (8.3 s of a 13.7 s warm run of 8,000 long texts): the digests are cached with the embeddings."""
    import csv

    import torch

    from repair.data import load_data
    from repair.embeddings import extract

    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(40):
            w.writerow([f"the movie {'was great ' * (i % 5)} plot {i}", ["negative", "positive"][i % 2]])
    data = load_data(path)
    cold = extract(bert, data, cache_dir=tmp_path / "c", progress=False, device="cpu")
    calls = []
    real = type(bert).input_keys
    monkeypatch.setattr(type(bert), "input_keys", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    warm = extract(bert, data, cache_dir=tmp_path / "c", progress=False, device="cpu")
    assert not cold.from_cache and warm.from_cache and calls == []
    assert cold.inputs is not None and torch.equal(warm.inputs, cold.inputs)
    assert torch.equal(warm.X, cold.X)
