"""Provenance written into every file ``repair`` produces.

The same string-to-string map goes into safetensors metadata and ONNX
``metadata_props``: ``format: pt`` (transformers 4.x refuses safetensors
metadata without it) and namespaced ``repair.*`` keys. Never a machine path, and no
wall-clock time: the same inputs and seed give byte-identical files. ``repair.created`` is
written only when the caller passes it or ``SOURCE_DATE_EPOCH`` is set (reproducible builds'
convention: that time, in UTC).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Any, Optional

from ._version import __version__
from .io import parse_json

PREFIX = "repair."


def merged(source: dict, new: dict) -> dict[str, str]:
    """A file's metadata: the source checkpoint's entries with ``new`` written over them; when
    ``new`` is a provenance (``repair.*`` keys), the source's own ``repair.*`` keys go (they describe
    the run that made the source, not this one: this record names the source by its hash)."""
    fresh = any(str(k).startswith(PREFIX) for k in new)
    out = {str(k): str(v) for k, v in source.items() if not (fresh and str(k).startswith(PREFIX))}
    out.update({str(k): str(v) for k, v in new.items()})
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def build(*, source_sha256: str, method: str, settings: Optional[dict] = None,
          figures: Optional[dict] = None, measured_on: Optional[str] = None,
          extra: Optional[dict] = None, created: Optional[str] = None) -> dict[str, str]:
    """``figures``: before/after metrics; ``measured_on``: a plain description of
    the data they come from (e.g. "held-out 30% of the repair set (n=312)"),
    never a path."""
    meta = {
        "format": "pt",
        f"{PREFIX}tool": "repair",
        f"{PREFIX}version": __version__,
        f"{PREFIX}method": method,
        f"{PREFIX}settings": canonical_json(settings or {}),
        f"{PREFIX}source_sha256": source_sha256,
    }
    created = created or source_date()
    if created:
        meta[f"{PREFIX}created"] = created
    if figures is not None:
        meta[f"{PREFIX}figures"] = canonical_json(figures)
    if measured_on is not None:
        meta[f"{PREFIX}measured_on"] = measured_on
    for k, v in (extra or {}).items():
        meta[f"{PREFIX}{k}"] = v if isinstance(v, str) else canonical_json(v)
    return meta


def source_date() -> Optional[str]:
    """``SOURCE_DATE_EPOCH`` as an ISO time in UTC, or None when it is unset or not a number."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw.isdigit():
        return None
    return _dt.datetime.fromtimestamp(int(raw), _dt.timezone.utc).isoformat()


def merge(existing: Optional[dict], new: dict[str, str]) -> dict[str, str]:
    """Keep the source file's metadata; ours wins on our own keys."""
    out = {str(k): str(v) for k, v in (existing or {}).items()}
    out.update(new)
    return out


def read(meta: dict[str, str]) -> dict[str, Any]:
    """The ``repair.*`` keys of a metadata map, JSON values decoded."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if not k.startswith(PREFIX):
            continue
        try:
            out[k[len(PREFIX):]] = parse_json(v) if v[:1] in "{[" else v
        except json.JSONDecodeError:
            out[k[len(PREFIX):]] = v
    return out
