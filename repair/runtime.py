"""Runtime options of every command (no torch: the command line builds them before anything loads)."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import BadInput

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass
class RuntimeOptions:
    """How to run: device, batch size, the embedding cache, progress. Validated when made (the
    device's presence is checked when it is first used: that needs torch)."""
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:1"
    batch_size: int = 64
    cache_dir: Optional[str] = None      # default: $REPAIR_CACHE_DIR or ~/.cache/repair/embeddings
    use_cache: bool = True
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device not in ("auto", "cpu"):       # is it there? (needs torch; only then)
            from .embeddings import check_device

            check_device(self.device)
        from .rules import whole_number

        self.batch_size = whole_number(self.batch_size, "--batch-size", 1)
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)
        from .rules import check_bool

        check_bool(self.use_cache, "use_cache (--no-cache)")
        check_bool(self.progress, "progress (--quiet)")


#: messages that survive ``progress=False`` (``--quiet``): only progress goes, warnings and notices stay
KEPT_WHEN_QUIET = ("warning", "notice", "error", "FAILED")


def stderr_log(progress: bool = True) -> Callable[[str], None]:
    """The log a run writes to stderr, a line per message (a user's names shown as they are on one line,
    :func:`repair.io.visible`, :func:`repair.io.one_line`):
    every line, or without ``progress`` warnings and notices only. The one home of that rule (the
    command line's ``--quiet``, a library call's ``RuntimeOptions(progress=False)``)."""
    def log(msg: str) -> None:
        from .io import one_line, visible

        if sys.stderr is None:             # no stderr (pythonw): print would write to stdout instead
            return
        if progress or str(msg).lstrip().startswith(KEPT_WHEN_QUIET):
            print(visible(one_line(msg)), file=sys.stderr, flush=True)
    return log


__all__ = ["KEPT_WHEN_QUIET", "RuntimeOptions", "stderr_log"]
