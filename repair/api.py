"""Public library functions; the CLI commands are thin shims over these."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .adapters import Adapter, LoadOptions, load_model
from .data import DataOptions, Encoded, RepairData, encode, load_data
from .embeddings import Embeddings, extract
from .errors import BadInput
from .metrics import evaluate
from .probing import probe


from .runtime import RuntimeOptions  # noqa: F401  (defined without torch; part of this API)


@dataclass
class Prepared:
    adapter: Adapter
    data: RepairData
    enc: Encoded
    emb: Embeddings

    def logits(self) -> torch.Tensor:
        W, b = self.adapter.head_params()
        return self.emb.X @ W.T + b


def check_modality(adapter: Adapter, data: RepairData) -> None:
    if adapter.modality != data.modality:
        raise BadInput(f"the model takes {adapter.modality} input but the data holds {data.modality}s",
                       data.where)


def prepare_data(adapter: Adapter, data_path, data_opts: DataOptions, runtime: RuntimeOptions,
                 group_by: Optional[str] = None, emb=None) -> tuple[RepairData, Encoded, Embeddings]:
    """``data_path``: a path, or the :class:`RepairData` already read from it. ``emb``: its embeddings
    when the caller has them, or a function giving them (called once the data is encoded: its labels
    are checked before any embedding)."""
    data = data_path if isinstance(data_path, RepairData) else load_data(data_path, data_opts)
    check_modality(adapter, data)
    enc = encode(data, adapter.class_names, group_by if group_by is not None else data_opts.group_by)
    emb = emb() if callable(emb) else emb
    if emb is None:
        emb = embed(adapter, data, runtime)
    elif emb.X.shape[0] != len(data):
        raise ValueError(f"prepare_data: {len(data)} samples, {emb.X.shape[0]} embeddings")
    return data, enc, emb


def embed(adapter: Adapter, data: RepairData, runtime: RuntimeOptions) -> Embeddings:
    """:func:`repair.embeddings.extract` as ``runtime`` says (its cache, device, batch size, progress)."""
    return extract(adapter, data, batch_size=runtime.batch_size, device=runtime.device,
                   cache_dir=runtime.cache_dir, use_cache=runtime.use_cache, progress=runtime.progress)


def embedding_rows(emb: Embeddings, keep) -> Embeddings:
    """``emb`` restricted to the rows ``keep`` (indices, in order): data some of whose samples are left
    out of a figure is embedded whole and masked, so its cache entry is the one a plain run of that data
    uses, and nothing is embedded twice."""
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    return dataclasses.replace(emb, X=emb.X[idx], inputs=None if emb.inputs is None else emb.inputs[idx])


def _check_cache_dir(adapter: Adapter, model, data: list, runtime: RuntimeOptions) -> None:
    """:func:`repair.preflight.check_cache_dir` for a library call (the CLI checks before the model
    loads): the cache never goes into the model's folder or the data read."""
    from .preflight import check_cache_dir
    from .rules import Protected

    protected = Protected().add(adapter.source if isinstance(model, Adapter) else model, "input model")
    for d in data:
        protected.add_data(d, "data")
    check_cache_dir(protected, runtime)


def prepare(model_path, data_path, load_opts: Optional[LoadOptions] = None,
            data_opts: Optional[DataOptions] = None, runtime: Optional[RuntimeOptions] = None,
            also: tuple = (), _adopt: bool = True, _emb=None) -> Prepared:
    """The model loaded, the data read and encoded, its embeddings (cached). ``also``: other data the
    run reads (:class:`RepairData`), which the cache may not go into either. ``_adopt``: a model given
    loaded has its in-place changes registered (False: the caller did it, or loaded it itself).
    ``_emb``: the data's embeddings where the caller has them (:func:`prepare_data`)."""
    from .rules import check_options, model_arg

    load_opts = check_options(load_opts, LoadOptions, "load_options")
    data_opts = check_options(data_opts, DataOptions, "data_options")
    runtime = check_options(runtime, RuntimeOptions, "runtime") or RuntimeOptions()
    # a model already loaded (repair.load_model) is used as it is, as export_model and verify_model do
    model = model_arg(model_path, adopt=_adopt)
    adapter = model if isinstance(model, Adapter) else load_model(model, load_opts)
    data = data_path if isinstance(data_path, RepairData) else load_data(data_path, data_opts or DataOptions())
    _check_cache_dir(adapter, model, [data, *also], runtime)
    data, enc, emb = prepare_data(adapter, data, data_opts or DataOptions(), runtime, emb=_emb)
    return Prepared(adapter, data, enc, emb)


def model_keys(adapter: Adapter, data: RepairData, runtime=None, digests=None) -> Optional[list]:
    """Each sample of ``data`` as ``adapter``'s model reads it, a key per row: an image's model input
    (:func:`repair.embeddings.image_input_keys`, kept in ``runtime``'s cache when it is on; read from
    ``digests``, its :attr:`Embeddings.inputs`, when the caller embedded it: nothing decoded again), a
    text's tokens (:meth:`Adapter.input_keys`); None where nothing is known beyond the bytes. The one
    home of that rule for one data set (:func:`_model_keys` compares two; ``--train`` computes its own
    once, for the overlap checks and the provenance)."""
    if data.modality == "image":
        from .embeddings import digest_keys, image_input_keys

        if digests is not None:
            return digest_keys(digests)
        cached = dict(use_cache=False) if runtime is None else dict(
            cache_dir=runtime.cache_dir, use_cache=runtime.use_cache, batch_size=runtime.batch_size,
            device=runtime.device)
        return image_input_keys(adapter, data, **cached)
    return adapter.input_keys(data.items)


def _model_keys(adapter: Adapter, data: RepairData, other: RepairData, runtime=None, inputs=(None, None),
                keys=(None, None)):
    """(keys of ``data``'s samples, keys of ``other``'s, how they were found the same): equal keys for
    two samples the model reads as one -- a text that differs only in case or spacing the tokenizer
    drops, an image the model is fed identically (the same picture in another file format or encoding,
    or saved at another size the model's resize reads the same): :func:`model_keys`, the rule the repair
    set's own splits apply; None where nothing is known beyond the bytes. ``inputs``: the input digests
    (:attr:`Embeddings.inputs`) of ``data`` and of ``other`` where the caller embedded them; ``keys``:
    their :func:`model_keys` where the caller has them (neither is decoded or tokenized again)."""
    if not len(other) or not len(data) or data.modality != other.modality:
        return None
    mine, theirs = (k if k is not None else model_keys(adapter, d, runtime, i)
                    for d, i, k in zip((data, other), inputs, keys))
    if mine is None or theirs is None:
        return None
    how = ", as the model reads them (the same images in other files)" if data.modality == "image" else \
        ", as the model reads them"
    return mine, theirs, how


def read_as_same(adapter: Adapter, data: RepairData, other: RepairData, overlap: list,
                 where=None, exclude_flag: Optional[str] = None, runtime=None, inputs=(None, None)) -> list:
    """``overlap`` (per sample of ``other``: an identical sample, byte for byte, is in ``data``) widened
    to the samples the model reads as one of ``data``'s (:func:`_model_keys`; ``runtime``: its cache;
    ``inputs``: the input digests of ``data`` and ``other`` the caller has). Data whose every sample is
    then in ``data`` is refused as :func:`repair.preflight.eval_overlap` refuses it."""
    from .preflight import refuse_full_overlap

    keys = _model_keys(adapter, data, other, runtime, inputs)
    if keys is None:
        return list(overlap)
    mine, theirs, how = keys
    seen = set(mine)
    wider = [bool(o) or k in seen for o, k in zip(overlap, theirs)]
    if wider != list(map(bool, overlap)):
        refuse_full_overlap(wider, other, where, exclude_flag=exclude_flag, how=how)
    return wider


def same_samples(adapter: Adapter, data: RepairData, other: RepairData, runtime=None,
                 inputs=(None, None), keys=(None, None)) -> list[bool]:
    """Per sample of ``other``: whether it is one of ``data``'s, byte for byte or as the model reads it
    (:func:`read_as_same`'s rule, refusing nothing): what ``--train`` leaves out of training. ``inputs``,
    ``keys``: as :func:`_model_keys` takes them."""
    seen = set(data.content_hashes())
    same = [h in seen for h in other.content_hashes()]
    keys = _model_keys(adapter, data, other, runtime, inputs, keys)
    if keys is None:
        return same
    mine = set(keys[0])
    return [s or k in mine for s, k in zip(same, keys[1])]


def left_out_groups(full: RepairData, class_names, group_by: Optional[str], kept) -> list[str]:
    """The groups (class x value of ``group_by``) of data ``full``, and its class x value gaps, that
    are not among ``kept`` (the group names of the rows a figure is measured on, once some of
    ``full``'s rows were left out): the figure cannot speak for them. The one home of that rule
    (``repair fix --eval`` leaving out repair-set samples, ``repair eval --exclude``)."""
    if group_by is None:
        return []
    f = encode(full, class_names, group_by)
    kept = set(kept or [])
    return [g for g in [*f.group_names, *(f.absent_groups or [])] if g not in kept]


def mark_duplicates(report: dict, data: RepairData, groups: Optional[torch.Tensor],
                    inputs: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                    ids: Optional[torch.Tensor] = None) -> Optional[str]:
    """Identical samples (the same model input -- ``inputs``, the embeddings' input digests: an
    image's pixels as preprocessed, a text's tokens --, else the same bytes) in the data a figure is measured on: each copy
    counts in the figure, so it is surer than its distinct samples allow. ``report["duplicates"]`` gets
    the counts (:func:`repair.data.duplicate_stats`) and, with any, each group row its ``n_distinct``
    (what the small-group warnings count, :func:`repair.selection.figure_warnings`). Returns the
    warning to show, or None. ``ids``: the rows' duplicate ids where the caller has them
    (:meth:`RepairData.duplicate_ids`, or a part of a larger set's: any numbering), else computed
    from ``inputs``."""
    from .data import duplicate_stats, label_conflicts

    if ids is None:
        ids = data.duplicate_ids(inputs)
    elif tuple(ids.shape) != (len(data),):
        raise ValueError(f"mark_duplicates: {len(data)} samples, ids of shape {tuple(ids.shape)}")
    st = duplicate_stats(ids)
    report["duplicates"] = st
    if not st["n_duplicates"]:
        return None
    if groups is not None:
        for i, row in enumerate(report.get("per_group") or []):
            row["n_distinct"] = int(ids[groups == i].unique().numel())
    if y is not None:
        for i, row in enumerate(report.get("per_class") or []):
            row["n_distinct"] = int(ids[y == i].unique().numel())
    conflicts = None if y is None else label_conflicts(data, ids, y)
    return (f"the data holds {st['n_duplicates']} duplicate sample(s) ({st['n_unique']} distinct of "
            f"{st['n_samples']}): every copy counts in the figures, which are no surer than the distinct samples"
            + (f"; {conflicts}, and counts in the figures" if conflicts else ""))


def repair_set_rows(adapter: Adapter, data: RepairData, inputs=None) -> Optional[list]:
    """Per row of ``data``: whether its sample is one of the repair set this model was repaired on, by
    its provenance (``repair.samples``, :func:`repair.provenance.samples_record`: the samples as the
    model reads them -- a text by its tokens, an image by its model input, ``inputs`` being the
    embeddings' input digests). Data that is all such samples is a BadInput -- no figure is measured on
    data the repair touched, and a gate on it would pass on fitted rows -- however its rows are ordered,
    labelled, grouped or repeated; :func:`evaluate_model` and :func:`probe_model` leave the other
    rows out of their figures. None when nothing is recorded (not a repaired model, or one changed
    since). Provenance written before the record: the whole set by its ``samples_sha256``; before that,
    row for row (``content_sha256``)."""
    from . import provenance

    if adapter.changed_since_provenance():
        return None
    # the record of the samples is read whatever else the provenance holds (a settings record changed or
    # removed by hand must not let a figure count the repair's own samples)
    ident = provenance.recorded_settings(adapter.source_metadata, adapter.source).get("data")
    if ident is None and provenance.read(adapter.source_metadata).get("samples") is None:
        return None
    where = data.where
    keys = provenance.sample_keys(data, inputs, adapter)
    rows = recorded_repair_rows(adapter, data, inputs, keys)
    if rows is not None and len(data) and all(rows):
        raise BadInput("holds only samples of the repair set this model was repaired on (its provenance records "
                       "them): figures on it would count samples the repair fitted on; measure on data the "
                       "repair never touched", where)
    if rows is not None or ident is None:
        return rows
    # before the record: the whole set by its distinct samples, or row for row by its bytes (which no
    # --max-length or --image-size of this run changes)
    if isinstance(ident.get("samples_sha256"), str):
        # a text's key was its whole input_keys digest before the record was written (cut to 16 bytes now)
        full = adapter.input_keys(data.items) if data.modality == "text" else None
        if ident["samples_sha256"] in {provenance.data_identity(data, None, inputs, adapter, keys=k)["samples_sha256"]
                                       for k in (keys, *([list(map(str, full))] if full is not None else []))}:
            raise BadInput("holds the samples of the repair set this model was repaired on (its provenance records "
                           "them): figures on it would count samples the repair fitted on; measure on data the "
                           "repair never touched", where)
    if not ident.get("content_sha256") or ident.get("n") != len(data):
        return None
    group_by = ident.get("group_by")
    if group_by is not None and group_by not in data.attributes:
        return None
    if provenance.data_identity(data, group_by, inputs, keys=keys)["content_sha256"] == ident["content_sha256"]:
        raise BadInput("is the repair set this model was repaired on (its provenance records the same samples, "
                       "labels and groups): figures on it would count samples the repair fitted on; measure on "
                       "data the repair never touched", where)
    return None


def recorded_repair_rows(adapter: Adapter, data: RepairData, inputs=None, keys=None) -> Optional[list]:
    """Per row of ``data``: whether the model's provenance records its sample among the repair set its
    file was repaired on (``repair.samples``: :func:`repair.provenance.recorded_rows`), whatever was
    done to the model since; None when the file records none. ``keys``: the rows'
    :func:`repair.provenance.sample_keys` when the caller has them. What :func:`repair_set_rows`
    reads, and what ``repair fix`` of a repaired model keeps out of its figures."""
    from . import provenance

    source_metadata = getattr(adapter, "source_metadata", None) or {}
    meta = provenance.read(source_metadata)
    record = meta.get("samples")
    if record is None:
        return None
    settings = provenance.recorded_settings(source_metadata, getattr(adapter, "source", None))
    if not settings:       # the samples are keyed as the settings' preprocessing read them: without it, no
        # sample would be found, and a figure could count the repair's own (fail closed)
        raise BadInput("its provenance records the samples of its repair set but not the settings they were "
                       "read with (repair.settings was removed since it was written): restore it, or remove the "
                       "repair.* metadata to read the weights as a plain file", getattr(adapter, "source", None))
    keys = provenance.sample_keys(data, inputs, adapter) if keys is None else keys
    rows = provenance.recorded_rows(data, keys, record)
    # texts read at another --max-length than the repair's: their tokens there are other keys (and a
    # case or spacing variant's bytes too), so they are also read as the repair read them
    at = (settings.get("preprocess") or {}).get("max_length")
    if (rows is not None and not all(rows) and data.modality == "text" and at is not None
            and at != getattr(adapter, "max_length", None)):
        again = adapter.input_keys(data.items, max_length=at)
        if again is not None:
            there = provenance.in_samples_record([str(k)[:32] for k in again], record)
            rows = [a or b for a, b in zip(rows, there)]
    # images read with other preprocessing than the repair's (another --image-size, --mean, --std): their
    # model inputs are other keys, so they are also read as the repair read them (decoded once more)
    cfg = provenance.recorded_image_preprocess(source_metadata, getattr(adapter, "source", None))
    mine = (adapter.preprocess_id() or {}).get("image") if data.modality == "image" else None
    mine = {k: mine[k] for k in provenance.IMAGE_PREPROCESS_KEYS if k in mine} if isinstance(mine, dict) else None
    if (rows is not None and not all(rows) and cfg is not None and mine is not None
            and provenance.canonical_json(cfg) != provenance.canonical_json(mine)):
        from .embeddings import image_input_keys_read_as

        try:
            again = image_input_keys_read_as(data, cfg)
        except BadInput as e:   # an image the repair's preprocessing refuses: whether it is one of the repair's
            # samples cannot be told, so no figure is measured (fail closed), saying what to give
            raise BadInput("cannot tell which of these images the repair fitted: read as the repair read them "
                           f"(its recorded preprocessing, input {cfg.get('input_size')}), {e.problem}; evaluate "
                           "with the repair's preprocessing", e.path or data.where) from None
        except Exception as e:  # a recorded preprocessing this install cannot build: the same
            raise BadInput("cannot tell which of these images the repair fitted: its recorded preprocessing "
                           f"({provenance.canonical_json(cfg)[:200]}) cannot be rebuilt here ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); evaluate with the "
                           "repair's preprocessing", data.where) from None
        if again is not None:
            rows = [a or b for a, b in zip(rows, provenance.in_samples_record(again, record))]
    return rows


def _without_repair_set(p: Prepared, group_by: Optional[str]) -> tuple[Prepared, int]:
    """``p`` with the rows :func:`repair_set_rows` finds in the model's repair set left out (their
    embeddings too: nothing is read again), and how many were."""
    rows = repair_set_rows(p.adapter, p.data, p.emb.inputs)
    if not rows or not any(rows):
        return p, 0
    keep = [i for i, r in enumerate(rows) if not r]
    sub = p.data.subset(keep)
    return (Prepared(p.adapter, sub, encode(sub, p.adapter.class_names, group_by), embedding_rows(p.emb, keep)),
            len(rows) - len(keep))


def evaluate_model(model_path, data_path, load_opts: Optional[LoadOptions] = None,
                   data_opts: Optional[DataOptions] = None, runtime: Optional[RuntimeOptions] = None,
                   exclude=None) -> dict:
    """Figures of the model on ``data_path``. ``exclude`` (a path, or data already read): samples
    identical to one of its samples (the same image bytes or pixels, the same text or tokens) are left out of the figures -- the
    repair set a model was repaired on, so that a re-gate on held-out data never counts a sample the
    repair fitted on; the groups that leaves without rows are absent (a worst-group gate fails closed
    on them), and data that is all such samples is a BadInput."""
    data_opts = data_opts or DataOptions()
    left_out = None
    emb_of = None
    ex_notes: list = []
    if exclude is not None:
        from .preflight import eval_overlap, read_data

        data = read_data(data_path, data_opts)
        ex = read_data(exclude, dataclasses.replace(data_opts, group_by=None))     # read as the data is
        ex_notes = list(ex.notes)
        overlap = eval_overlap(ex, data, data.where, exclude_flag="--exclude")
        from .rules import check_options, model_arg

        model = model_arg(model_path)            # loaded once: it also says which texts it reads as the same
        model_path = model if isinstance(model, Adapter) else load_model(
            model, check_options(load_opts, LoadOptions, "load_options"))
        rt = check_options(runtime, RuntimeOptions, "runtime") or RuntimeOptions()
        _check_cache_dir(model_path, model, [data, ex], rt)       # before the input keys are cached
        # --exclude data the model cannot read (texts beside an image model) would match no sample and
        # leave every figure as it was: refused as --eval data of the other kind is
        check_modality(model_path, data)
        check_modality(model_path, ex)
        first = None
        if data.modality == "image":
            # an image's key is its model input, which embedding it computes: the data is embedded
            # first (whole, each image decoded once) and its keys read from the embeddings; a text's
            # keys are its tokens (cheap): data that is all --exclude is refused before any embedding
            first = embed(model_path, data, rt)
        overlap = read_as_same(model_path, ex, data, overlap, data.where, exclude_flag="--exclude",
                               runtime=rt, inputs=(None, None if first is None else first.inputs))
        left_out = sum(bool(o) for o in overlap)
        keep = [i for i, o in enumerate(overlap) if not o]
        full, data_path = data, (data.subset(keep) if left_out else data)

        def whole(e=first, keep=keep, masked=bool(left_out), adapter=model_path):
            """The whole data embedded (its cache entry is a plain eval's), the rows left out masked."""
            e = e if e is not None else embed(adapter, full, rt)
            return embedding_rows(e, keep) if masked else e
        emb_of = whole
    p = prepare(model_path, data_path, load_opts, data_opts, runtime, also=(ex,) if exclude is not None else (),
                _adopt=exclude is None, _emb=emb_of)      # with --exclude the model was taken (and adopted) above
    before = p.data
    p, in_repair_set = _without_repair_set(p, data_opts.group_by)
    if in_repair_set and not left_out:
        full = before                                # the groups it leaves without rows are absent too
    report = evaluate(p.logits(), p.enc.y, p.enc.class_names, p.enc.groups, p.enc.group_names)
    report["absent_groups"] = list(p.enc.absent_groups) if p.enc.groups is not None else None
    if (left_out or in_repair_set) and report["absent_groups"] is not None:
        report["absent_groups"] += [g for g in left_out_groups(full, p.enc.class_names, data_opts.group_by,
                                                               p.enc.group_names)
                                    if g not in report["absent_groups"]]
    from .selection import figure_warnings

    dup_note = mark_duplicates(report, p.data, p.enc.groups, p.emb.inputs, p.enc.y)
    # groups too small for an honest figure, or with none (label-free: no groups to speak of)
    report["warnings"] = (list(p.data.notes) + ex_notes + figure_warnings(report, what="the figures")
                          + ([dup_note] if dup_note else []))
    # what was left out, in the order it was (--exclude, then the model's own repair set), each count with
    # what it is a count of, and the figures' rows said once, last
    left: list[str] = []
    if exclude is not None:
        report["excluded"] = {"data": str(exclude.where if isinstance(exclude, RepairData) else exclude),
                              "n": left_out}
        if left_out:
            left.append(f"{left_out} of the {len(full)} samples are also in {report['excluded']['data']}")
    report["in_repair_set"] = in_repair_set
    if in_repair_set:
        left.append(f"{in_repair_set} of the {len(before)} samples{' left' if left_out else ''} are in the repair set "
                    "this model was repaired on (its provenance records them)")
    report["warnings"][:0] = [f"{w}: left out of the figures" + (f", which are measured on the other {len(p.data)}"
                                                                 if k == len(left) else "")
                              for k, w in enumerate(left, 1)]
    report.update({
        "model": {**p.adapter.describe(), **p.adapter.identity()},
        "data": {"source": str(p.data.where), "n": len(p.data), "modality": p.data.modality,
                 "group_by": (data_opts or DataOptions()).group_by},
        "embedding": {"from_cache": p.emb.from_cache, "seconds": round(p.emb.seconds, 4),
                      "device": p.emb.device, "cache_key": p.emb.key},
    })
    return report


def probe_model(model_path, data_path, load_opts: Optional[LoadOptions] = None,
                data_opts: Optional[DataOptions] = None, runtime: Optional[RuntimeOptions] = None,
                top_k: int = 10) -> dict:
    from .rules import whole_number

    top_k = whole_number(top_k, "top_k (--top)", 1)
    p = prepare(model_path, data_path, load_opts, data_opts, runtime)
    n = len(p.data)
    p, in_repair_set = _without_repair_set(p, (data_opts or DataOptions()).group_by)   # its accuracies are figures too
    W, b = p.adapter.head_params()
    report = probe(p.emb.X, p.enc.y, W, b, p.enc.class_names, top_k=top_k, where=p.adapter.source)
    from .selection import figure_warnings

    # the warnings eval gives its figures where they apply: a class with no or a few samples (its
    # accuracy), and what the reader said of the data as a whole. Not a pseudo-group's (class x
    # misclassified is 0% by definition): how few errors a class has is the neuron test's to weigh
    figs = {"per_class": [{"name": r["class"], "n": r["n"]} for r in report["per_class"]]}
    report["warnings"] = list(p.data.notes) + figure_warnings(figs, what="the probe's figures")
    report["in_repair_set"] = in_repair_set
    if in_repair_set:
        report.setdefault("warnings", []).insert(
            0, f"{in_repair_set} of the {n} samples are in the repair set this model was repaired on (its "
               f"provenance records them): left out of the accuracies, which are measured on the other {len(p.data)}")
    report.update({
        "model": {**p.adapter.describe(), **p.adapter.identity()},
        "data": {"source": str(p.data.where), "n": len(p.data), "modality": p.data.modality},
        "embedding": {"from_cache": p.emb.from_cache, "seconds": round(p.emb.seconds, 4),
                      "device": p.emb.device},
    })
    return report

