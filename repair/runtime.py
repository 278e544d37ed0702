"""Runtime options of every command (no torch: the command line builds them before anything loads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class RuntimeOptions:
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:1"
    batch_size: int = 64
    cache_dir: Optional[str] = None      # default: $REPAIR_CACHE_DIR or ~/.cache/repair/embeddings
    use_cache: bool = True
    progress: bool = True


__all__ = ["RuntimeOptions"]
