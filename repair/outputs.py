"""What a run writes, written as one transaction: ``repair fix``, ``repair export`` and each
model of ``repair zoo`` go through :class:`ModelOutputs`.

A run's outputs -- the model in its own format (with provenance), an ONNX file verified against
onnxruntime (inside a folder output or beside a file output), the files a model repair made, and
an HTML report with its JSON -- are staged beside their final names and renamed into place
together only when every one of them was written and verified (:func:`repair.io.outputs`). A
failed verification, a full disk under the report or an interrupt leaves none of them behind,
so the identical rerun starts clean.

:func:`export_model` is the public export verb (``repair export``): load, write, verify.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import provenance
from .errors import BadInput, GateFailed, RepairError


@dataclass
class OnnxExport:
    """An ONNX export verified on ``verify_items``. ``path`` None: ``model.onnx`` inside the folder
    output. ``reference_logits``: the model's logits on the items when already known (a head repair
    on cached embeddings), so the verification needs no PyTorch forward pass."""
    path: Optional[Path]
    verify_items: Sequence[Any]
    tolerance: Optional[float] = None
    reference_logits: Any = None
    device: str = "cpu"
    opset: Optional[int] = None
    exporter: str = "auto"


@dataclass
class HtmlReport:
    """``--report FILE.html`` (JSON beside it): ``build(written)`` returns the report document,
    given what the transaction wrote (final paths)."""
    path: Path
    build: Callable[[dict], dict]


@dataclass
class ModelOutputs:
    """One run's outputs (see the module docstring). ``model``: the checkpoint in its own format;
    ``onnx``: an export; ``artifacts``: a folder of files a model repair made, kept inside a folder
    output or beside a file output at ``artifacts_to``; ``report``: the HTML page."""
    adapter: Any
    metadata: dict
    model: Optional[Path] = None
    onnx: Optional[OnnxExport] = None
    artifacts: Optional[Path] = None
    artifacts_to: Optional[Path] = None
    report: Optional[HtmlReport] = None
    force: bool = False
    log: Optional[Callable[[str], None]] = None
    written: dict = field(default_factory=dict)

    def write(self) -> dict:
        """Write everything, all or nothing. Returns ``{"model", "weights_file", "export",
        "artifacts", "report"}`` (final paths; the export's verification report)."""
        from .io import outputs

        w: dict[str, Any] = {"model": None, "weights_file": None, "export": None, "artifacts": None,
                             "report": None}
        a = self.adapter
        check_beside = getattr(a, "check_written_beside", None)     # an ONNX model: what is beside it is read
        if self.model is not None and check_beside is not None:     # with it (nothing is written yet)
            check_beside(Path(self.model))
        if self.onnx is not None and self.onnx.path is not None:   # any model's ONNX export, as well
            from .adapters.onnx_adapter import check_onnx_written_beside

            check_onnx_written_beside(a, Path(self.onnx.path))     # its place follows --out
        with outputs(force=self.force, log=self.log) as tx:
            if self.model is not None:
                final = Path(self.model)
                tmp = tx.stage(final)
                t0 = time.perf_counter()
                written = Path(a.save(tmp, dict(self.metadata)))
                saved_s = time.perf_counter() - t0
                _check_metadata(written, self.metadata)
                w["model"] = str(final)
                w["weights_file"] = str(final / written.relative_to(tmp)) if written != tmp else str(final)
                if self.artifacts is not None and self.artifacts_to is not None and final in self.artifacts_to.parents:
                    dest = tmp / self.artifacts_to.relative_to(final)
                    _clear_staged(dest, tmp)     # never nested in (or merged with) another run's record
                    shutil.move(str(self.artifacts), str(dest))
                    w["artifacts"] = str(self.artifacts_to)
                if self.onnx is not None and a.exports_onnx_natively:
                    # the repaired model is itself the ONNX file: verify what was written
                    w["export"] = self._native_export(written, final, saved_s, t0)
                elif self.onnx is not None and self.onnx.path is None:
                    from .adapters.onnx_adapter import check_onnx_written_beside

                    check_onnx_written_beside(a, tmp / "model.onnx")       # beside what save copied
                    w["export"] = self._export(tmp / "model.onnx", final / "model.onnx")
            if self.onnx is not None and self.onnx.path is not None and w["export"] is None:
                w["export"] = self._export(tx.stage(Path(self.onnx.path), kind="file"), Path(self.onnx.path))
            if self.artifacts is not None and w["artifacts"] is None and self.artifacts_to is not None:
                adir = tx.stage(Path(self.artifacts_to), is_dir=True)
                for child in Path(self.artifacts).iterdir():
                    shutil.move(str(child), str(adir / child.name))
                w["artifacts"] = str(self.artifacts_to)
            if self.report is not None:
                from .report import render, report_json
                from .rules import report_outputs

                html, js = report_outputs(self.report.path)
                w["report"] = str(html)
                doc = self.report.build(dict(w))
                tx.stage(js, kind="file").write_text(report_json(doc), encoding="utf-8")
                tx.stage(html, kind="file").write_text(render(doc), encoding="utf-8")
        self.written = w
        return w

    def _export(self, target: Path, final: Path) -> dict:
        from .export import export_onnx, name_export_file

        o = self.onnx
        rep = export_onnx(self.adapter, target, metadata=self.metadata, verify_items=list(o.verify_items),
                          tolerance=o.tolerance, opset=o.opset, device=o.device, exporter=o.exporter,
                          progress=self.log, reference_logits=o.reference_logits)
        return name_export_file(rep, final)

    def _native_export(self, written: Path, final: Path, saved_s: float, t0: float) -> dict:
        """The report of an ONNX model's repaired file, ``written`` (staged) for ``final``: verified as
        written, with the fields ``repair export`` of it gives (:func:`repair.export.export_report`)."""
        from .export import _opset, export_report, name_export_file, verify_onnx

        a, o, meta = self.adapter, self.onnx, {}
        try:
            rep = verify_onnx(written, a, list(o.verify_items), tolerance=o.tolerance, metadata=meta)
        except GateFailed as e:
            if getattr(e, "report", None) is not None:
                name_export_file(e.report, None)          # nothing is written: nor its staging name
            raise
        return export_report(rep, final, exporter="graph-edit", opset=_opset(a.proto), input_names=a.input_names,
                             metadata_keys=meta, export_seconds=saved_s, t0=t0)


def _clear_staged(dest: Path, staged: Path) -> None:
    """Remove ``dest`` -- a path inside ``staged``, the output this transaction staged -- if the
    model's ``save`` left anything there (a copy of the source's own repair artifacts), so this
    run's artifacts are moved to exactly ``dest``: ``shutil.move`` into an existing folder would
    nest them inside the old ones. Nothing outside ``staged`` is touched."""
    dest, staged = Path(dest), Path(staged)
    if staged not in dest.parents:
        raise RepairError(f"the repair artifacts {dest} are not inside the staged output {staged}")
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()


def _check_metadata(written: Path, metadata: dict) -> None:
    """The provenance round-trips through a written safetensors file (ONNX files are checked by
    their verification)."""
    if written.suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    with safe_open(str(written), framework="pt") as f:
        meta = dict(f.metadata() or {})
    missing = [k for k in metadata if meta.get(k) != str(metadata[k])]
    if missing:
        raise RepairError(f"metadata did not round-trip through the written file ({missing[0]})")


def export_provenance(adapter, fmt: str) -> dict[str, str]:
    """Provenance of an export: a repaired model keeps its own and notes the export (``repair fix``'s
    model in memory too: :meth:`~repair.adapters.Adapter.adopt_provenance`); a model whose tensors a
    caller changed in memory gets a record saying so (method ``unrecorded``, the tensors' names); any
    other model a record saying nothing was repaired."""
    # the source by its content, never by its name: the same model exported from another folder is the
    # same file
    export_info = {"format": fmt, "source_sha256": adapter.source_sha256()}
    src = dict(getattr(adapter, "source_metadata", {}) or {})
    recorded = any(k.startswith(provenance.PREFIX) for k in src)
    if recorded and not adapter.changed_since_provenance():
        meta = {k: v for k, v in src.items() if k.startswith(provenance.PREFIX)}
        meta["format"] = "pt"
        meta[f"{provenance.PREFIX}export"] = provenance.canonical_json(export_info)
        return meta
    changed = adapter.changed_tensors()
    if changed or recorded:          # changed in memory after what the record describes: no record of how
        extra = {"export": export_info, "changed_tensors": changed}
        if recorded:
            extra["changed_after"] = src.get(f"{provenance.PREFIX}method", "")
            chain = provenance.lineage(src, getattr(adapter, "source", None))
            if chain:
                extra["lineage"] = chain
        return provenance.build(source_sha256=adapter.source_sha256(), method="unrecorded", extra=extra)
    return provenance.build(source_sha256=adapter.source_sha256(), method="none", extra={"export": export_info})


DEFAULT_MAX_VERIFY = 512


def check_device(device: str) -> str:
    """The device of a verification: :func:`repair.embeddings.check_device` (BadInput for one this
    machine lacks)."""
    from .embeddings import check_device as check

    return check(device)


def export_model(model, out=None, *, data=None, format: str = "onnx", load_options=None, data_options=None,
                 tolerance: Optional[float] = None, opset: Optional[int] = None, exporter: str = "auto",
                 max_verify: int = DEFAULT_MAX_VERIFY, force: bool = False, device: str = "cpu",
                 log: Optional[Callable[[str], None]] = None) -> dict:
    """Export ``model`` (a checkpoint path, or an :class:`repair.adapters.Adapter` already loaded)
    as ONNX -- verified with onnxruntime on up to ``max_verify`` samples of ``data`` (a path or a
    :class:`repair.data.RepairData`) before it is moved into place -- or as safetensors in the
    model's own format. Returns the export report (``passed``, ``path``, the verification figures).
    A failed verification raises :class:`repair.errors.GateFailed` (``.report`` on it) and writes
    nothing. Every check runs before the model is loaded. ``log``: progress, warnings and notices
    (default: stderr, as :func:`repair.fix` writes them). ``force``: True or False."""
    from .adapters import load_model
    from .data import RepairData, load_data
    from .rules import Protected, check_export_options, check_format, check_writable, export_output, model_output_kind

    from .adapters import LoadOptions
    from .data import DataOptions
    from .io import as_path
    from .rules import ONNX_ONLY, check_bool, check_max_verify, check_options, model_arg, onnx_only_given

    fmt = check_format(format)
    check_device(device)
    check_bool(force, "--force")
    if log is None:                # as a library fix logs: warnings and notices (a weights file left out) never lost
        from .runtime import stderr_log

        log = stderr_log()
    model = model_arg(model)
    adapter = None if isinstance(model, Path) else model
    model_path = model if adapter is None else Path(adapter.source)
    if adapter is None and not model_path.exists():
        raise BadInput("model not found", model_path)
    check_max_verify(max_verify)
    load_options = check_options(load_options, LoadOptions, "load_options")
    data_options = check_options(data_options, DataOptions, "data_options")
    out = export_output(model_path, fmt, None if out is None else as_path(out, "the output (--out)"))
    loaded = None
    protected = Protected()
    if fmt == "onnx":
        if data is None:
            raise BadInput("--data is needed for an ONNX export: the export is verified on samples of it")
        loaded = data if isinstance(data, RepairData) else load_data(data, data_options)
        check_export_options(opset, exporter, tolerance)
        protected.add_data(loaded, "data (--data)")
        for note in loaded.notes:          # what the data's reading says (files not read), as eval says it
            log(f"warning: {note}")
    else:
        for name in onnx_only_given(tolerance=tolerance, max_verify=max_verify, opset=opset, exporter=exporter,
                                    max_verify_default=DEFAULT_MAX_VERIFY):
            raise BadInput(f"--{name.replace('_', '-')} is {ONNX_ONLY[name]}; it applies to --format onnx, "
                           f"not {fmt}")
        if isinstance(data, (str, Path)):
            protected.add(data, "data (--data)")
    protected.add(model_path, "input model")
    protected.check(out)
    check_writable(out, force=force, log=log, kind="file" if fmt == "onnx" else model_output_kind(model_path))
    if adapter is None:
        adapter = load_model(model_path, load_options)
    protected.add_files(_source_files(adapter), "input model")
    protected.check(out)
    if fmt == "safetensors":
        left_out = adapter.check_save()                 # a symlink leaving the folder: refused before writing
        if left_out:                                    # the source's weights in other formats: not copied
            log(left_out)
    with _as_deployed(adapter, loaded):
        return _export(adapter, fmt, out, loaded, model_path, max_verify, tolerance, device, opset, exporter,
                       force, log)


@contextlib.contextmanager
def _as_deployed(adapter, data):
    """The adapter in inference mode (every module ``eval()``), decoding with ``data``'s pixel limit,
    while it is exported or verified; then as the caller gave it (modes and limit restored)."""
    pixels = adapter.max_pixels
    if data is not None:
        adapter.max_pixels = data.max_pixels
    try:
        with adapter.inference():
            yield adapter
    finally:
        adapter.max_pixels = pixels


def _export(adapter, fmt, out, loaded, model_path, max_verify, tolerance, device, opset, exporter, force, log):
    from .api import check_modality
    from .export import pick_verify_items

    meta = export_provenance(adapter, fmt)
    t0 = time.perf_counter()
    if fmt == "safetensors":
        if adapter.exports_onnx_natively:
            raise BadInput("an ONNX model can only be exported to ONNX (--format onnx)", model_path)
        mo = ModelOutputs(adapter, meta, model=out, force=force, log=log)
        w = mo.write()
        from safetensors import safe_open

        with safe_open(w["weights_file"], framework="pt") as f:
            keys = sorted((f.metadata() or {}))
            n = len(list(f.keys()))
        return {"format": "safetensors", "path": str(out), "weights_file": w["weights_file"], "n_tensors": n,
                "metadata_keys": keys, "passed": True, "seconds": round(time.perf_counter() - t0, 3)}
    check_modality(adapter, loaded)
    items = pick_verify_items(loaded.items, max_verify)
    mo = ModelOutputs(adapter, meta, onnx=OnnxExport(out, items, tolerance=tolerance, device=device, opset=opset,
                                                     exporter=exporter), force=force, log=log)
    try:
        rep = mo.write()["export"]
    except GateFailed as e:
        rep = getattr(e, "report", None)
        if rep is not None:
            rep["path"] = None
        raise
    notice = tokenizer_notice(adapter, Path(out))
    if notice and log is not None:
        log(notice)
    return rep


def tokenizer_notice(adapter, onnx_path: Path) -> Optional[str]:
    """The notice for a text model's ONNX written where no tokenizer files are (the graph takes token
    ids: repair eval, a zoo or a deployment cannot read texts with it), naming the files to copy
    beside it; None for an image model or when they are there (``repair export``, ``fix --export``)."""
    from .adapters.text import has_tokenizer_files

    if adapter.modality != "text" or has_tokenizer_files(Path(onnx_path).parent):
        return None
    return (f"notice: {onnx_path} takes token ids: to read texts with it (repair eval, a zoo, a deployment), put "
            f"the model's tokenizer files beside it ({', '.join(_tokenizer_names(adapter))}); repair fix --export "
            "onnx of a model folder writes model.onnx into the repaired folder, beside them")


def _tokenizer_names(adapter) -> list[str]:
    """The tokenizer files of a text model's folder, by name (the ones to copy beside its ONNX export)."""
    from .adapters.text import TOKENIZER_DIGEST_FILES, tokenizer_files

    tok = getattr(adapter, "tokenizer", None)
    names = [p.name for p in tokenizer_files(tok)] if tok is not None else []   # the files it reads (bpe.codes...)
    if not names:
        folder = Path(getattr(adapter, "model_folder", None) or Path(adapter.source).parent)
        names = [f for f in TOKENIZER_DIGEST_FILES if (folder / f).exists()]
    return names or ["tokenizer.json", "tokenizer_config.json"]


def verify_model(onnx_path, reference, data, *, load_options=None, data_options=None,
                 tolerance: Optional[float] = None, max_verify: int = DEFAULT_MAX_VERIFY, device: str = "cpu",
                 log: Optional[Callable[[str], None]] = None) -> dict:
    """``repair verify``: onnxruntime on ``onnx_path`` against ``reference`` (a checkpoint path or an
    Adapter) on up to ``max_verify`` samples of ``data``. Returns the report (``passed``); nothing is
    written. Every check runs before the reference is loaded."""
    from .adapters import load_model
    from .api import check_modality
    from .data import RepairData, load_data
    from .export import pick_verify_items, verify_onnx
    from .rules import check_tolerance

    from .adapters import LoadOptions
    from .data import DataOptions
    from .io import as_path
    from .rules import check_max_verify, check_options, model_arg

    onnx_path = as_path(onnx_path, "the ONNX model")
    if onnx_path.suffix.lower() != ".onnx":
        raise BadInput("expected an .onnx file", onnx_path)
    if not onnx_path.is_file():
        raise BadInput("ONNX model not found" if not onnx_path.exists() else "expected an .onnx file, got a folder",
                       onnx_path)
    reference = model_arg(reference, "the reference model (--reference)")
    if isinstance(reference, Path) and not reference.exists():
        raise BadInput("reference model not found", reference)
    if isinstance(reference, Path) and reference.is_file() and os.path.samefile(reference, onnx_path):
        raise BadInput("the reference is the ONNX file being checked (it would pass against itself); "
                       "give the model it was exported from", reference)
    check_max_verify(max_verify)
    load_options = check_options(load_options, LoadOptions, "load_options")
    data_options = check_options(data_options, DataOptions, "data_options")
    loaded = data if isinstance(data, RepairData) else load_data(data, data_options)
    if tolerance is not None:
        check_tolerance(tolerance)
    check_device(device)
    for note in loaded.notes:              # what the data's reading says (files not read), as eval says it
        (log or _stderr_log())(f"warning: {note}")
    ref = load_model(reference, load_options) if isinstance(reference, Path) else reference
    check_modality(ref, loaded)
    with _as_deployed(ref, loaded):
        items = pick_verify_items(loaded.items, max_verify)
        return verify_onnx(onnx_path, ref, items, tolerance=tolerance, device=device, check=False, progress=log)


def _stderr_log():
    from .runtime import stderr_log

    return stderr_log()


def _source_files(adapter) -> list:
    return list(adapter.source_files())


__all__ = ["HtmlReport", "ModelOutputs", "OnnxExport", "export_model", "export_provenance", "verify_model"]
