"""The libraries that tokenize a text model's samples are in the embedding cache key and the written
model's code record (session 49 left this open): a SentencePiece or tiktoken tokenizer's ids, and the
protobuf that reads a SentencePiece model when transformers converts it, can change with an upgrade, so
the old version's embeddings never serve the new one."""
from __future__ import annotations

from importlib import metadata

from repair import embeddings, provenance


def _key_with(monkeypatch, versions: dict) -> dict:
    real = metadata.version

    def fake(name):
        if name in versions:
            if versions[name] is None:
                raise metadata.PackageNotFoundError(name)
            return versions[name]
        return real(name)

    monkeypatch.setattr(metadata, "version", fake)
    monkeypatch.setattr(provenance, "_VERSIONS", {})
    monkeypatch.setattr(embeddings, "_CODE_KEY", {})
    return embeddings.code_key()


def test_a_tokenizing_librarys_version_is_in_the_cache_key_and_the_code_record(monkeypatch):
    for lib in ("sentencepiece", "tiktoken", "protobuf"):
        assert lib in provenance.CODE_LIBRARIES
        a = _key_with(monkeypatch, {lib: "1.0"})
        assert a["libraries"][lib] == "1.0"
        assert provenance.library_versions()[lib] == "1.0"
        b = _key_with(monkeypatch, {lib: "1.1"})
        assert a != b, lib                       # an upgrade: another cache key
        assert _key_with(monkeypatch, {lib: None})["libraries"][lib] is None    # not installed: recorded so
