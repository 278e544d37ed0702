"""`repair fix`: repair a model from its repair set, honestly measured.

The repair set is split (seeded, stratified by group, or by class x
correctly/incorrectly classified without group labels; :mod:`repair.selection`) into

- a *report* part no fitting or selection ever touches, for the before/after
  figures (only without ``--eval``; with ``--eval`` the figures come from that
  separate data set), and
- the *fit* part, the only data the repairs and the choice between them see.

Candidates of a recipe are compared on the fit part by the recipe's criterion
(:class:`repair.selection.Criterion`; ``auto``: worst-group accuracy with
``--group-by``, else the label-free default):

- head repairs by K-fold cross-validation (every fit-part sample scored by a head
  that did not see it), the chosen one refitted on the whole fit part;
- when the recipe also has model repairs (which change the backbone and cost a
  training run each), they are scored on the same folds against the head the recipe
  would return without them, which is returned unchanged when it wins
  (:mod:`repair.choosing`).

A head repair's new head is written into the head; a model repair's changed tensors
(any of them) are written back by the adapter. Either way the output is the
checkpoint's own format, with provenance (method, settings, seed, the tensors that
changed, steps) and, with ``--export onnx``, a verified ONNX file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import provenance
from .adapters import LoadOptions, load_model
from .api import (RuntimeOptions, check_modality, embed, embedding_rows, left_out_groups, mark_duplicates,
                  model_keys, prepare_data, read_as_same, recorded_repair_rows, same_samples)
from .choosing import FitContext, choose, selection_basis
from .data import DataOptions, Encoded, RepairData, encode, label_conflicts
from .embeddings import Embeddings, extract, resolve_device
from .errors import BadInput
from .metrics import evaluate
from .preflight import Inputs, check_cache_dir, fix_outputs, read_inputs
from .selection import (MIN_FOR_CHOICE, MIN_FOR_REPORT, figure_warnings, inferred_group_names,
                        inferred_groups, stratified_split, support_warnings)


@dataclass
class FixOptions:
    """What ``repair fix`` does beyond the model, the data and the output; validated when made
    (a bad value is :class:`BadInput` naming the option, from Python as from the CLI)."""
    recipe: str = "auto"                  # built-in recipe name or a YAML path
    seed: int = 0
    report_fraction: float = 0.25         # held out for the reported figures when no eval data is given
    selection_folds: Optional[int] = None  # K of the cross-validation comparing candidates (recipe's)
    eval_data: Any = None                 # separate test set for before/after (a path or RepairData)
    eval_group_by: Optional[str] = None   # group column of the eval data (default: --group-by)
    export: Optional[str] = None          # "onnx": also export and verify ONNX
    tolerance: Optional[float] = None     # ONNX verification tolerance override
    max_verify: Optional[int] = None      # ONNX verification: at most this many samples (default 512)
    budget: Optional[str] = None          # model repairs: "300steps", "3epochs", "10min"
    #: inputs of model repairs by the name they are declared with (``repair methods``; e.g.
    #: ``{"masks": "masks/", "train": "train.csv"}``): each method checks the ones it uses
    resources: dict = field(default_factory=dict)
    report: Optional[str] = None          # an HTML report (JSON beside it), written with the model
    force: bool = False
    allow_finetune: bool = False          # recipe auto may escalate to a model repair (runs recipe auto-ft)
    allow_plugins: bool = False           # a recipe's ``plugins:`` may run (they are code)

    #: the flags (:func:`repair.rules.cli_flag`) of the options named otherwise than ``--field-name``
    FLAGS = {"eval_data": "--eval", "report_fraction": "report_fraction", "resources": "resources"}

    def __post_init__(self):
        """Each refusal is :class:`repair.rules.OptionRefused` naming the option (``.option``: the field), in
        the flags' words; a zoo names the manifest's field and words it in fields (:meth:`~OptionRefused.worded`)."""
        from .rules import OptionRefused, cli_flag

        def refuse(option: str, rule: str, subject: bool = True, **values):
            return OptionRefused(option, rule, values, self.FLAGS, subject=subject)

        def check(option: str, rule: Callable, *args):
            try:
                return rule(*args)
            except BadInput as e:        # a rule of its own (check_seed, ...), naming the flag itself
                raise OptionRefused.of(option, e) from None

        from .rules import check_bool
        from .rules import check_tolerance

        for name in ("force", "allow_finetune", "allow_plugins"):
            check(name, check_bool, getattr(self, name), cli_flag(name))
        if not isinstance(self.recipe, (str, Path)) or not str(self.recipe).strip():
            raise refuse("recipe", "must be a recipe name or a YAML path, got {got}", got=repr(self.recipe))
        from .config import check_seed

        self.seed = check("seed", check_seed, self.seed)
        if not (isinstance(self.report_fraction, (int, float)) and 0 < self.report_fraction < 1):
            raise refuse("report_fraction", "must be between 0 and 1, got {got}", got=repr(self.report_fraction))
        if self.selection_folds is not None:
            from .recipes import check_folds

            check("selection_folds", check_folds, self.selection_folds, "selection_folds")
        from .rules import ONNX_ONLY, check_format, onnx_only_given

        if self.export is not None:
            try:                                  # the rule is check_format's; the words name the option
                self.export = check_format(self.export, "export", ("onnx",))
            except BadInput:
                raise refuse("export", "must be onnx, got {got}", got=repr(self.export)) from None
        if self.tolerance is not None:
            self.tolerance = check("tolerance", check_tolerance, self.tolerance)
        if self.max_verify is not None:
            from .rules import check_max_verify

            self.max_verify = check("max_verify", check_max_verify, self.max_verify)
        if self.export is None:
            for name in onnx_only_given(tolerance=self.tolerance, max_verify=self.max_verify):
                raise refuse(name, f"is {ONNX_ONLY[name]}; give {{export}} onnx too")
        if self.eval_group_by is not None and self.eval_data is None:
            raise refuse("eval_group_by", "names a group column of the {eval_data} data; give {eval_data} too")
        if self.allow_finetune and str(self.recipe) not in ("auto", "auto-ft"):
            raise refuse("allow_finetune", "applies to {recipe} auto, not {got}", got=repr(self.recipe))
        if not isinstance(self.resources, dict):
            raise refuse("resources", "must be a mapping of model-repair input name -> value")
        self.resources = {k: v for k, v in self.resources.items() if v is not None}
        if self.budget is not None:
            check("budget", _budget_cls().parse, self.budget)
        if self.report is not None:
            from .rules import report_outputs

            check("report", report_outputs, self.report)


def _budget_cls():
    from .modelrepair.finetune import Budget

    return Budget


@dataclass
class FixResult(Mapping):
    """What :func:`fix_model` returns: the result document (``report``, read it like a dict:
    ``result["after"]``) and what it had in hand, so a report or a zoo needs no reload: the repaired
    ``adapter``, the repair data as read, its ``embeddings`` under the original body and the
    ``original_head`` (W, b)."""
    report: dict
    adapter: Any = None
    data: Optional[RepairData] = None
    encoded: Optional[Encoded] = None
    embeddings: Optional[Embeddings] = None
    original_head: Optional[tuple] = None

    def __getitem__(self, key):
        return self.report[key]

    def __repr__(self) -> str:
        """One line a notebook can show: what was repaired, where it went, what was chosen and the
        figures (the default dumped the adapter, every sample path and the embeddings)."""
        r = self.report
        after = r.get("after") or {}
        figs = ", ".join(f"{k}={after[k]:.4g}" for k in ("accuracy", "worst_group_accuracy", "worst_class_accuracy")
                         if isinstance(after.get(k), (int, float)))
        model = (r.get("model") or {}).get("source")
        return f"FixResult(model={model!r}, output={r.get('output')!r}, chosen={r.get('candidate')!r}, after: {figs})"

    def __iter__(self):
        return iter(self.report)

    def __len__(self):
        return len(self.report)

    def delta_histogram(self, bins: int = 30, top: int = 5) -> dict:
        """The probe's per-neuron delta of the ORIGINAL model on the repair set (the report's
        histogram), from the embeddings already extracted."""
        W, b = self.original_head
        return _delta_histogram(self.embeddings.X, self.encoded.y, W, b, self.encoded.class_names, bins, top)


# ------------------------------------------------------------------- checks
def check_repair_set(enc: Encoded, num_classes: int, where) -> None:
    from .data import check_classes_present

    check_classes_present(enc.y, list(enc.class_names)[:num_classes], where)
    present = torch.unique(enc.y).tolist()
    if enc.groups is not None:
        # groups = class x attribute value: every combination must have samples
        attr_values = sorted({a for _, a in enc.group_keys})
        have = set(enc.group_keys)
        column = enc.group_by
        missing = [f"{enc.class_names[c]}|{column}={a}" for c in present for a in attr_values if (c, a) not in have]
        if missing:
            n = int(enc.y.numel())
            hint = (f"; the column {column!r} has {len(attr_values)} values for {n} samples: --group-by names an "
                    "attribute whose few values many samples share (a background, a domain)"
                    if len(attr_values) > max(2, n // 4) else "")
            raise BadInput(f"group {missing[0]} has no samples in the repair set"
                           + (f" ({len(missing)} of the {len(present) * len(attr_values)} class x {column} groups "
                              "have none)" if len(missing) > 1 else "") + hint, where)


def _load_recipe(o: FixOptions):
    from .recipes import load_recipe

    return load_recipe("auto-ft" if o.allow_finetune else o.recipe, allow_plugins=o.allow_plugins)


def _duplicates(data: RepairData, emb):
    """(ids of identical samples, their counts for the report): a sample by its model input (the
    embeddings' input digests: an image's copy in another format, a text the tokenizer reads as the
    same tokens), else by its bytes."""
    from .data import duplicate_stats

    ids = data.duplicate_ids(getattr(emb, "inputs", None))
    return ids, duplicate_stats(ids)


# ---------------------------------------------------------------------- main
def _with_autograd(fn):
    """``fn`` run with autograd on and float32 the default dtype, as the command runs it, whatever the
    caller's modes: a notebook's ``with torch.no_grad():`` or ``torch.inference_mode()`` around
    ``repair.fix`` would leave a model repair's loss without gradients (the head repairs need none; the
    extraction turns them off itself), and a float64 default would promote what a layer makes."""
    import functools

    from .adapters.base import float32_default

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad(), float32_default():
            return fn(*args, **kwargs)
    return run


@_with_autograd
def fix_model(model_path, data_path, out_path=None, *, load_opts: Optional[LoadOptions] = None,
              data_opts: Optional[DataOptions] = None, runtime: Optional[RuntimeOptions] = None,
              options: Optional[FixOptions] = None, inputs: Optional[Inputs] = None,
              log: Optional[Callable[[str], None]] = None) -> FixResult:
    """Repair ``model_path`` from the repair set ``data_path`` (a path, or the
    :class:`repair.data.RepairData` already read) and write it to ``out_path`` (default: beside
    the model). ``inputs``: what :func:`repair.preflight.read_inputs` already read (the CLI reads
    before loading torch). Every input is read once and the model loaded once."""
    from .io import as_path, scratch_dir
    from .rules import check_options, model_arg

    t_start = time.perf_counter()
    model_path = model_arg(model_path, loaded=False)
    if out_path is not None:
        out_path = as_path(out_path, "the output (--out)")
    load_opts = check_options(load_opts, LoadOptions, "load_options")
    o = check_options(options, FixOptions, "options") or FixOptions()
    runtime = check_options(runtime, RuntimeOptions, "runtime") or RuntimeOptions()
    if log is None:                # progress as runtime says (--quiet: warnings and notices only)
        from .runtime import stderr_log

        log = stderr_log(runtime.progress)
    data_opts = check_options(data_opts, DataOptions, "data_options") or DataOptions()
    recipe = _load_recipe(o)
    from .recipes import group_labels_needed

    why = group_labels_needed(recipe) if data_opts.group_by is None else None
    if why:                                  # before any work, not when its turn comes
        raise BadInput(f"{why} (give --group-by)", recipe.files[0] if recipe.files else None)
    budget = _budget_cls().parse(o.budget)
    if inputs is None:
        inputs = read_inputs(model_path, data_path, data_opts, eval_data=o.eval_data,
                             eval_group_by=o.eval_group_by, resources=o.resources,
                             load_opts=load_opts or LoadOptions())
    inputs.protected.add_files(recipe.files, "recipe (--recipe)")        # its YAML and plugin files
    paths = fix_outputs(model_path, out_path, o, inputs, log=log,      # named, apart, replacing no input, writable
                        model_repairs="model" in recipe.kinds)
    check_cache_dir(inputs.protected, runtime, paths)
    out_path = paths["--out"]
    resources = dict(inputs.resources)
    if resources and "model" not in recipe.kinds:
        given = ", ".join("--" + k.replace("_", "-") for k in resources)
        raise BadInput(f"{given}: inputs of model repairs, but recipe {recipe.name!r} has none")
    for name in resources:                   # an input no candidate reads would be ignored in silence
        if not any(name in {r.name for r in c.info.resources} for c in recipe.candidates if c.info.kind == "model"):
            from .methods import list_methods

            users = sorted(m.name for m in list_methods("model") if name in {r.name for r in m.resources})
            raise BadInput(f"--{name.replace('_', '-')}: no candidate of recipe {recipe.name!r} uses it"
                           + (f" (it is an input of {', '.join(users)})" if users else ""))
    _check_extras(recipe, resources)      # an optional package the run needs: asked for before any work
    # the file and folder inputs by content, read before any work (an unreadable file in them is said now,
    # not after the training); the chosen repair's are recorded (_finish)
    from .registry import resource as _declared

    input_digests = {name: provenance.input_digest(v) for name, v in sorted(resources.items())
                     if v is not None and _declared(name).kind in ("file", "folder")}
    adapter = load_model(model_path, load_opts)
    inputs.protected.add_files(adapter.source_files(), "input model")
    for flag, p in paths.items():         # the model's files too (a model repair's files folder included)
        inputs.protected.check(p, flag.split(" (")[0])
    left_out = adapter.check_save()       # a symlink leaving the model folder: refused before any work
    check_beside = getattr(adapter, "check_written_beside", None)   # an ONNX model: a preprocess.json where
    if check_beside is not None:                                    # it is written would be read with it
        check_beside(Path(out_path))
    if o.export == "onnx" and not adapter.exports_onnx_natively:   # any model's ONNX export, as well
        from .adapters.onnx_adapter import PREPROCESS_FILE, check_onnx_written_beside

        if paths.get("--export onnx") is not None:                  # a file beside --out
            check_onnx_written_beside(adapter, Path(paths["--export onnx"]))
        elif isinstance(model_path, (str, os.PathLike)) and Path(model_path).is_dir():   # model.onnx in the output folder, beside
            check_onnx_written_beside(adapter, Path(out_path) / "model.onnx",        # the copy of the source's
                                      side=Path(model_path) / PREPROCESS_FILE)
    if left_out:                          # the source's weights in other formats: not in the output
        log(left_out)
    if "model" in recipe.kinds and not adapter.can_train:
        adapter.trainable()                                   # raises BadInput naming the family
    _check_scopes(recipe, adapter)
    for c in recipe.candidates:
        if c.info.kind == "model" and adapter.modality not in c.info.modalities:
            kinds = " or ".join(c.info.modalities)
            raise BadInput(f"{c.method} needs {'an' if kinds[0] in 'aeiou' else 'a'} {kinds} model; "
                           f"{Path(model_path).name} is {'an' if adapter.modality[0] in 'aeiou' else 'a'} "
                           f"{adapter.modality} model", Path(model_path))
    log(f"loaded {adapter.family} model {Path(model_path).name}: {len(adapter.class_names)} classes")
    # an image's key (which --eval samples the model reads as repair samples) is its model input, which
    # embedding it computes: images are embedded first, each decoded once, and their keys read from the
    # embeddings; a text's keys are its tokens (cheap): an --eval that is all repair texts is refused
    # before any embedding
    image = adapter.modality == "image" and inputs.data.modality == "image"
    if inputs.eval_data is not None:     # --eval of the other kind: refused before any work, for either kind
        check_modality(adapter, inputs.eval_data)
    if inputs.eval_data is not None and not image:   # --eval samples the model reads as repair samples count as those
        inputs.eval_overlap = read_as_same(adapter, inputs.data, inputs.eval_data, inputs.eval_overlap, o.eval_data,
                                           runtime=runtime)
    train_notes: list[str] = []
    if o.budget is not None and "model" not in recipe.kinds:     # said, not dropped in silence (a zoo's
        train_notes.append(f"the training budget {o.budget} (--budget, a zoo row's budget) bounds the training of "
                           f"model repairs; recipe {recipe.name!r} has none, so it does not apply")         # default may hold one for every row)
    trains = [name for name, v in resources.items() if isinstance(v, RepairData)]
    for name in trains:                          # --train's labels and modality: checked before any work
        _check_train_set(adapter, resources[name], data_opts)
    emb = eval_emb = None
    if image:
        data, enc, emb = prepare_data(adapter, inputs.data, data_opts, runtime)
        if inputs.eval_data is not None:     # embedded whole (its cache entry is a plain eval's), copies masked
            check_modality(adapter, inputs.eval_data)
            eval_emb = embed(adapter, inputs.eval_data, runtime)
            inputs.eval_overlap = read_as_same(adapter, inputs.data, inputs.eval_data, inputs.eval_overlap,
                                               o.eval_data, runtime=runtime, inputs=(emb.inputs, eval_emb.inputs))
    trained_on: dict = {}       # a data resource's samples a model repair trains on: recorded if one does
    for name in trains:
        resources[name] = _train_set(adapter, resources[name], data_opts, inputs, "--" + name.replace("_", "-"),
                                     train_notes, runtime, digests=(None if emb is None else emb.inputs,
                                                                    None if eval_emb is None else eval_emb.inputs),
                                     kept=trained_on.setdefault(name, []))
    if emb is None:
        data, enc, emb = prepare_data(adapter, inputs.data, data_opts, runtime)
    where = data.where
    C = len(adapter.class_names)
    check_repair_set(enc, C, where)
    log(f"repair set: {len(data)} samples, embeddings {'from cache' if emb.from_cache else 'extracted'} "
        f"in {emb.seconds:.1f}s")
    W0, b0 = adapter.head_params()
    X, y, groups = emb.X, enc.y, enc.groups
    orig_logits = X @ W0.T + b0
    has_groups = groups is not None
    # ---- splits: strata = groups, else class x original correctness; identical samples together
    crit, strata = selection_basis(recipe.selection, y, orig_logits, groups)
    clusters, dup_stats = _duplicates(data, emb)
    eval_given = inputs.eval_data is not None
    if eval_given:
        fit_idx, report_idx = torch.arange(len(y)), None
    else:
        fit_idx, report_idx = stratified_split(strata, [o.report_fraction], o.seed, clusters=clusters)
        # a repaired model repaired again: the samples its own repair fitted on are fitted again, never
        # measured (its provenance records them)
        earlier = recorded_repair_rows(adapter, data, emb.inputs)
        moved = [i for i in report_idx.tolist() if earlier[i]] if earlier is not None else []
        if moved:
            report_idx = torch.tensor([i for i in report_idx.tolist() if not earlier[i]], dtype=torch.long)
            fit_idx = torch.cat([fit_idx, torch.tensor(moved, dtype=torch.long)]).sort().values
            if not report_idx.numel():
                raise BadInput(f"every sample held out for the figures is in the repair set {Path(model_path).name} "
                               "was itself repaired on (its provenance records them): give --eval data neither "
                               "repair touched, or repair the original model", where)
            train_notes.append(f"{sum(map(bool, earlier))} of the {len(y)} samples of the repair set are in the repair "
                                f"set {Path(model_path).name} was itself repaired on (its provenance records them): "
                                f"fitted on, never measured (the {len(moved)} of them drawn for the held-out part "
                                f"too); the figures are measured on the other {report_idx.numel()} held out")
        if not report_idx.numel():
            distinct = int(clusters.unique().numel())
            size = (f"{len(y)} samples" if distinct == len(y) else
                    f"{len(y)} samples, {distinct} distinct: copies of one sample stay on one side of the split")
            raise BadInput(f"the repair set ({size}) is too small to hold out any for the figures: give "
                           "--eval data kept apart, or more samples", where)
        # the criterion is a choice: made on the fit part alone (the split's strata are the rows' labels)
        crit, _ = selection_basis(recipe.selection, y[fit_idx], orig_logits[fit_idx],
                                  None if groups is None else groups[fit_idx])
    fit_dev = str(resolve_device(runtime.device))
    # can this repair set support an honest choice and honest figures? say so when it cannot
    strata_names = list(enc.group_names) if has_groups else inferred_group_names(enc.class_names)
    warnings = list(inputs.data.notes) + list(getattr(inputs.eval_data, "notes", None) or []) + list(train_notes)
    if dup_stats["n_duplicates"]:
        warnings.append(f"the repair set holds {dup_stats['n_duplicates']} duplicate sample(s) ({dup_stats['n_unique']} "
                        f"distinct of {dup_stats['n_samples']}): identical samples are kept on one side of every "
                        "split, so no figure is measured on a sample that was fitted on")
        conflicts = label_conflicts(data, clusters, y)
        if conflicts:
            warnings.append(f"the repair set: {conflicts}, and is fitted on")
    # every choice made on the fit part's strata: between candidates, when to stop training, or a
    # lone head method's own inner choice (dfr's strength, afr's weighting), said once its fit shows
    # it had more than one setting to choose from (its diagnostics' ``candidates``; _finish)
    inner_choice = []
    if len(recipe.candidates) > 1 or "model" in recipe.kinds:
        warnings += support_warnings(strata[fit_idx], strata_names, minimum=MIN_FOR_CHOICE, clusters=clusters[fit_idx],
                                     what="choosing between candidates" if len(recipe.candidates) > 1
                                     else "choosing when to stop training")
    else:
        inner_choice = support_warnings(strata[fit_idx], strata_names, minimum=MIN_FOR_CHOICE,
                                        clusters=clusters[fit_idx],
                                        what=f"choosing {recipe.candidates[0].method}'s settings")
    if report_idx is not None:           # groups, or without labels the inferred groups
        warnings += support_warnings(strata[report_idx], strata_names, minimum=MIN_FOR_REPORT, among=strata,
                                     clusters=clusters[report_idx],
                                     what="the reported figures (held-out part of the repair set)")
    for w in warnings:
        log(f"warning: {w}")
    if "model" in recipe.kinds:
        resources["data_root"] = Path(data.source)
        resources["data_file"] = Path(data.where)     # what an error about the repair set names
        if has_groups:
            resources["group_names"] = list(enc.group_names)
            resources["group_values"] = [a for _, a in enc.group_keys]
    # model repairs get a scratch folder for the files they make (beside the output: the chosen one's
    # files are moved into place with it); it is removed whatever happens
    scratch = scratch_dir(out_path) if "model" in recipe.kinds else contextlib.nullcontext(None)
    with scratch as work:
        ctx = FitContext(adapter, data, X, y, groups, W0, b0, o.seed, fit_dev, budget, runtime.progress, log,
                         resources=resources, workdir=None if work is None else Path(work), clusters=clusters)
        ctx.warnings = warnings
        ctx.inner_choice_warnings = inner_choice
        ctx.input_digests = input_digests
        folds = int(o.selection_folds or recipe.folds)
        t_fit = time.perf_counter()
        choice = choose(recipe, ctx, fit_idx, strata[fit_idx], crit, orig_logits, folds, o.seed, log)
        ctx.wall_seconds = time.perf_counter() - t_fit
        for n in choice.notes:
            log(n)
        report = _finish(o, recipe, choice, crit, adapter, data, enc, emb, runtime, data_opts, inputs, fit_idx,
                         report_idx, model_path, paths, budget, ctx, dup_stats, t_start, log, eval_emb=eval_emb,
                         trained_on=trained_on)
    return FixResult(report, adapter=adapter, data=data, encoded=enc, embeddings=emb, original_head=(W0, b0))


def _check_scopes(recipe, adapter) -> None:
    """A model repair's settings that the model refuses: ``scope: "names:REGEX"`` that matches none of
    its parameters, a text model's ``mix_point`` beyond its last layer -- refused before any work
    (:class:`repair.config.SettingRefused` naming the recipe and candidate), whether or not the
    selection would have trained that candidate."""
    from .config import SettingRefused

    named = [c for c in recipe.candidates if c.info.kind == "model" and isinstance(c.params.get("scope"), str)
             and c.params["scope"].startswith("names:")]
    points = []                  # (candidate, mix_point) as its config reads it (3.0 is the whole number 3)
    for c in recipe.candidates:
        if c.info.kind == "model" and "mix_point" in c.params:
            try:
                p = getattr(c.config(), "mix_point", None)
            except Exception:    # its settings are refused where the recipe is checked
                p = None
            if isinstance(p, int) and p >= 0:
                points.append((c, p))
    if not (named or points) or not adapter.can_train:
        return
    model = adapter.trainable()
    checks = [(c, model.select, c.params["scope"]) for c in named] + \
             [(c, model.check_mix_point, p) for c, p in points]
    for c, check, value in checks:
        try:
            check(value)
        except SettingRefused as e:
            raise c.info.named(e) from None


def _check_extras(recipe, resources: dict) -> None:
    """The optional packages this run needs (a model repair's ``lora: true``: peft; ``--generator
    diffusers``: diffusers), importable -- or :class:`BadInput` saying how to install them, before any work."""
    from .modelrepair.trainable import require_package

    for c in recipe.candidates:
        if c.info.kind != "model":
            continue
        try:
            cfg = c.config()
        except Exception:                      # its settings are refused where the recipe is checked
            cfg = None
        where, what = tuple(c.origin) if c.origin else (None, c.method)
        if (c.params.get("lora") if cfg is None else getattr(cfg, "lora", False)) is True:
            require_package("peft", f"{what}: lora: true", "peft", where)
        uses = "generator" in {r.name for r in c.info.resources}
        if uses and resources.get("generator") == "diffusers":
            require_package("diffusers", "--generator diffusers", "diffusion")
        elif uses and resources.get("generator") is None and getattr(cfg, "generator", None) == "diffusers":
            require_package("diffusers", f"{what}: generator: diffusers", "diffusion", where)


def _check_train_set(adapter, d: RepairData, data_opts: DataOptions) -> None:
    """A data resource's (``--train``) modality and labels (matched to the model's classes): checked
    before any work, a label the model lacks naming itself."""
    from .data import encode

    check_modality(adapter, d)
    encode(d, adapter.class_names, data_opts.group_by if data_opts.group_by in d.attributes else None)


def _train_set(adapter, d: RepairData, data_opts: DataOptions, inputs: Inputs, flag: str, notes: list,
               runtime=None, digests=(None, None), kept: Optional[list] = None):
    """A data resource (``--train``) with labels matched to the model's classes (groups when the
    data has the --group-by column). Its samples that are also in the repair data or ``--eval`` are
    left out (``notes`` says how many): the choice and the figures are measured on those, and never
    on what was trained on; BadInput naming it when that leaves nothing. ``digests``: the input
    digests of the repair data and of --eval where they were embedded already (not decoded again).
    ``kept``: given the data, the indices of the samples kept for training and their :func:`model_keys`
    (what the repaired model's provenance records when a model repair trains on them)."""
    from .data import encode
    from .methods import TrainSet

    _check_train_set(adapter, d, data_opts)
    notes.extend(f"{flag}: {n}" for n in d.notes)       # what its reading says (files not read), as --data's
    gb = data_opts.group_by if data_opts.group_by in d.attributes else None
    if data_opts.group_by is not None and gb is None:
        # said, not silent: a repair that balances its training by group balances these rows by class
        notes.append(f"{flag} has no {data_opts.group_by!r} column (--group-by): its samples carry no group labels, "
                     "so a model repair that balances its training by group balances them by class only")
    mine = model_keys(adapter, d, runtime)         # its samples as the model reads them, once (and recorded)
    taken = same_samples(adapter, inputs.data, d, runtime, inputs=(digests[0], None), keys=(None, mine))
    if inputs.eval_data is not None:
        taken = [a or b for a, b in zip(taken, same_samples(adapter, inputs.eval_data, d, runtime,
                                                            inputs=(digests[1], None), keys=(None, mine)))]
    keep = [i for i, t in enumerate(taken) if not t]
    if not keep:
        raise BadInput(f"every sample of {flag} is also in the repair data (--data) or --eval: the choice and the "
                       "figures are measured there, never on what is trained on; give training data kept apart",
                       d.where)
    if kept is not None:
        kept[:] = [d, keep, mine]
    if len(keep) < len(d):
        notes.append(f"{len(d) - len(keep)} of the {len(d)} samples of {flag} are also in the repair data or --eval: "
                     f"left out of training, which uses the other {len(keep)}")
        d = d.subset(keep)
    e = encode(d, adapter.class_names, gb)
    return TrainSet(items=list(d.items), y=e.y, groups=e.groups, source=str(d.where))


def _kept_samples(adapter, d: RepairData, keep: list, keys: Optional[list]) -> tuple:
    """(the samples ``keep`` of data resource ``d``, their keys by the record's rule,
    :func:`repair.provenance.sample_keys`): ``keys``, their :func:`repair.api.model_keys` that
    ``_train_set`` computed (nothing decoded or tokenized again)."""
    sub = d if len(keep) == len(d) else d.subset(keep)
    if d.modality == "image" and keys is not None:
        return sub, [keys[i] for i in keep]          # a model input's digest: the record's key as it is
    return sub, provenance.sample_keys(sub, None, None, read=None if keys is None else [keys[i] for i in keep])


def _warn(ctx, log, w: str) -> None:
    """A warning of the run: in the results (``ctx.warnings``) and on stderr, said once."""
    ctx.warnings.append(w)
    log(f"warning: {w}")


def _finish(o, recipe, choice, crit, adapter, data, enc, emb, runtime, data_opts, inputs, fit_idx, report_idx,
            model_path, paths, budget, ctx, dup_stats, t_start, log, eval_emb=None, trained_on=None) -> dict:
    """The figures, the outputs and the report of a fit :func:`fix_model` made. ``eval_emb``: the whole
    --eval set's embeddings where they were taken before the fitting (an image set's: its input keys
    are read from them). ``trained_on``: per data resource (``--train``), the data and the indices of
    its samples a model repair could train on."""
    from .choosing import not_compared
    from .methods import head_notes
    from .outputs import HtmlReport, ModelOutputs, OnnxExport
    from .rules import artifacts_output

    chosen, final, selection = choice.chosen, choice.final, choice.selection
    X, y, groups = emb.X, enc.y, enc.groups
    has_groups = groups is not None
    W0, b0 = ctx.W0, ctx.b0
    eval_given = inputs.eval_data is not None
    out_path = paths["--out"]
    if len(recipe.candidates) > 1:
        if selection:
            log(f"chosen: {chosen.label} by {crit.describe(has_groups=enc.groups is not None)}")
        else:             # too few samples for the folds: no comparison ran, and the log says so
            log(f"chosen: {chosen.label}, the recipe's first candidate: the fit part is too small for "
                f"{int(o.selection_folds or recipe.folds)}-fold cross-validation, so no candidate was compared")
            _warn(ctx, log, not_compared(chosen.label))

    # ---- the data the figures are measured on (never fitted or selected on)
    if eval_given:
        eval_group_by = o.eval_group_by if o.eval_group_by is not None else data_opts.group_by
        e_opts = dataclasses.replace(data_opts, group_by=eval_group_by)
        ev, dropped = inputs.eval_data, sum(bool(x) for x in inputs.eval_overlap)
        keep = [i for i, x in enumerate(inputs.eval_overlap) if not x]
        if dropped:               # samples also in the repair set: the figures leave them out
            ev = ev.subset(keep)
            _warn(ctx, log, f"{dropped} of the {len(inputs.eval_data)} samples of --eval are also in the repair "
                            "data: left out of the figures, which are measured on the other "
                            f"{len(ev)}")

        def eval_rows(e=eval_emb, keep=keep, masked=bool(dropped)):
            """--eval embedded whole (its cache entry is a plain eval's; an image set's was embedded
            already), the rows also in the repair set masked."""
            e = e if e is not None else embed(adapter, inputs.eval_data, runtime)
            return embedding_rows(e, keep) if masked else e
        r_data, e_enc, e_emb = prepare_data(adapter, ev, e_opts, runtime, emb=eval_rows)
        # and the samples the source model's own repair fitted on (a repaired model repaired again)
        earlier_eval = recorded_repair_rows(adapter, r_data, e_emb.inputs)
        if earlier_eval is not None and any(earlier_eval):
            keep = [i for i, e in enumerate(earlier_eval) if not e]
            if not keep:
                raise BadInput(f"holds only samples of the repair set {Path(model_path).name} was itself repaired on "
                               "(its provenance records them): measure on data neither repair touched", o.eval_data)
            _warn(ctx, log, f"{len(earlier_eval) - len(keep)} of the {len(r_data)} samples of --eval are in the repair "
                            f"set {Path(model_path).name} was itself repaired on: left out of the figures, which are "
                            f"measured on the other {len(keep)}")
            dropped += len(earlier_eval) - len(keep)
            r_data = r_data.subset(keep)
            e_emb = embedding_rows(e_emb, keep)
            e_enc = encode(r_data, adapter.class_names, eval_group_by)
        rX, ry, rg, rnames = e_emb.X, e_enc.y, e_enc.groups, e_enc.group_names
        # groups the evaluation data lacks: its own class x value gaps, and (same column) the repair
        # set's groups it has no rows of -- a gate on its worst group cannot speak for them
        absent = list(e_enc.absent_groups or [])
        if eval_group_by == data_opts.group_by and enc.group_names:
            absent += [g for g in enc.group_names if g not in set(rnames) and g not in absent]
        if dropped and e_enc.groups is not None:
            # the groups --eval holds whose every row was also in the repair set (left out above): no
            # figure speaks for them either, whichever column the repair set was grouped by
            absent += [g for g in left_out_groups(inputs.eval_data, adapter.class_names, eval_group_by, rnames)
                       if g not in absent]
        eval_identity = provenance.data_identity(r_data, eval_group_by, e_emb.inputs, adapter)
        measured_on = f"separate evaluation data ({len(r_data)} samples" + (
            f"; {dropped} also in the repair set left out)" if dropped else ")")
    else:
        eval_identity = None
        r_data = data.subset(report_idx.tolist())
        rX, ry = X[report_idx], y[report_idx]
        rg = groups[report_idx] if has_groups else None
        rnames = enc.group_names
        absent = list(enc.absent_groups or [])
        measured_on = (f"held-out {round(100 * len(report_idx) / len(y))}% of the repair set ({len(report_idx)} "
                       "samples) that no fitting or selection saw")
    before_logits = rX @ W0.T + b0

    # ---- apply the repair
    if final.kind == "head":
        adapter.set_head(final.W, final.b)
        W1, b1 = adapter.head_params()        # as written (a float16 checkpoint rounds the head)
        after_logits = rX @ W1.T + b1
    else:
        adapter.set_tensors(final.tensors)
        log(f"measuring the repaired network on {len(r_data)} samples")
        W1, b1 = adapter.head_params()
        r_emb = extract(adapter, r_data, batch_size=runtime.batch_size, device=runtime.device,
                        cache_dir=runtime.cache_dir, use_cache=runtime.use_cache, progress=runtime.progress)
        after_logits = r_emb.X @ W1.T + b1
    before = evaluate(before_logits, ry, enc.class_names, rg, rnames)
    after = evaluate(after_logits, ry, enc.class_names, rg, rnames)
    if eval_given:                # copies within --eval count in its figures: say so (and count them once below)
        ids = r_data.duplicate_ids(e_emb.inputs)          # computed once for both figures
        dup_note = mark_duplicates(before, r_data, rg, y=ry, ids=ids)
        mark_duplicates(after, r_data, rg, ids=ids)
        if dup_note:
            _warn(ctx, log, f"--eval: {dup_note}")
    elif dup_stats["n_duplicates"]:  # the held-out part's copies: counted once in its groups' n_distinct (the
        held = ctx.clusters[report_idx]      # warnings were given when the part was drawn): the split's ids
        for fig in (before, after):
            mark_duplicates(fig, r_data, rg, ids=held)
    if rg is not None:
        before["absent_groups"] = after["absent_groups"] = absent
    if rg is None:  # label-free report: also show inferred groups of the report data (original model's)
        ig = inferred_groups(before_logits, ry)
        named = [f"{n} by original" for n in inferred_group_names(enc.class_names)]
        before["per_inferred_group"] = evaluate(before_logits, ry, enc.class_names, ig, named)["per_group"]
        after["per_inferred_group"] = evaluate(after_logits, ry, enc.class_names, ig, named)["per_group"]
    # groups too small for an honest figure, or with none: the held-out part's were checked when it was
    # drawn (against the whole repair set), what remains there is the column's absent class x value pairs
    for w in (figure_warnings(before, what="the reported figures (--eval data)") if eval_given else
              figure_warnings({"absent_groups": absent if rg is not None else [], "per_group": [],
                               "per_class": before.get("per_class")},   # its groups were checked when drawn
                              what="the reported figures (held-out part of the repair set)")):
        _warn(ctx, log, w)

    changed = adapter.changed_tensors()
    # the repair set's samples as the model reads them: its digest in the settings, and the per-sample
    # record (repair.samples) by which eval and probe leave them out of their figures
    sample_keys = provenance.sample_keys(data, emb.inputs, adapter)
    # the recipe by its name and where it came from: a file's by the sha256 of its bytes (and its plugins')
    settings = {"recipe": recipe.name, "recipe_source": provenance.recipe_identity(recipe),
                "method": chosen.method, "kind": chosen.info.kind,
                "config": final.config if isinstance(final.config, dict) else dataclasses.asdict(final.config),
                "selection": selection and crit.name,
                "seed": o.seed, "group_labels": "given" if has_groups else "none",
                "splits": {"fit": int(fit_idx.numel()),
                           "selection": selection and selection.get("scheme"),
                           "report": int(report_idx.numel()) if report_idx is not None else 0},
                # the data, by content and never by path: what a rerun must be given to reproduce this
                "data": provenance.data_identity(data, data_opts.group_by, emb.inputs, adapter, keys=sample_keys),
                "eval": eval_identity,
                # how the model read the data (an image's size and normalisation, a text's truncation):
                # the figures were measured so, and a --max-length or --image-size changes them
                "preprocess": adapter.preprocess_id(),
                # what built the network and which class each head row is: a bare weights file says neither
                "network": adapter.network_record(), "classes": [str(c) for c in adapter.class_names]}
    # where, on how many threads and in batches of how many: a trained network's numbers depend on them,
    # and so do a head's last digits on a large repair set (BLAS splits a fit's sums over the rows among
    # its threads: dfr at 20,000 x 1,024, 1 vs 2 threads, weights 0.1% apart) and the embeddings' last
    # bits (a batch's sums round by its size); on the same device, thread count and batch size the
    # same inputs give the same bytes
    settings["device"] = str(resolve_device(runtime.device))
    settings["threads"] = torch.get_num_threads()
    settings["batch_size"] = int(runtime.batch_size)
    loop = (final.diagnostics or {}).get("loop") or {} if final.kind == "model" else {}
    trained = final.kind == "model"          # a head chosen trained nothing: no budget applied to it
    if not trained:                          # what the head's fit asks the user to know (its cap reached)
        # a lone head's own choice among its settings rests on the fit part's groups too
        if len((final.diagnostics or {}).get("candidates") or []) > 1:
            for w in ctx.inner_choice_warnings:
                _warn(ctx, log, w)
        for w in head_notes(chosen.label, final.diagnostics):
            _warn(ctx, log, w)
    model_change = {"changed_tensors": changed, "steps": final.steps,
                    "budget": (loop.get("budget") or (budget.describe() if budget else None)) if trained else None,
                    "stopped_by": loop.get("stopped_by")}
    if trained:                              # what shaped the network beside the repair set
        # whether anything but the head differs from the source: a model repair whose training found no
        # state better than its start (best_step 0), or whose settling chose the original body, changed
        # only the head -- said so, not reported as a fine-tuned network
        for w in (final.diagnostics or {}).get("warnings") or []:     # a model repair's own (recompose's)
            _warn(ctx, log, w)
        from .modelrepair.finetune import DIVERGED, schedule_cut_short

        cut = schedule_cut_short(loop)
        if cut:
            _warn(ctx, log, f"{chosen.method}: {cut}")

        if loop.get("stopped_by") == DIVERGED:
            members = (loop.get("budget") or {}).get("member_stopped_by")
            which = (f"member(s) {', '.join(str(k) for k, m in enumerate(members) if m == DIVERGED)} of "
                     if members else "")
            _warn(ctx, log, f"{which}{chosen.method}'s training diverged (a loss or weights no longer finite): it "
                            "went back to its best evaluated state, or its start; a lower lr (or clip_norm) trains")
        heads = set(adapter.head_tensor_names())
        model_change["body_changed"] = any(n not in heads for n in changed)
        model_change["head_changed"] = any(n in heads for n in changed)
        model_change["best_step"] = loop.get("best_step")
        if not changed:
            _warn(ctx, log, f"{chosen.method} changed nothing: the output is the source model as it was (no "
                            "training step beat the start, and its head was kept)")
        elif not model_change["body_changed"]:
            w = (f"{chosen.method} kept the original body (the network's tensors but the head are the source's: "
                 f"no training step beat the start, or settling chose the original body); only the head changed")
            _warn(ctx, log, w)
        diag = final.diagnostics or {}
        if o.resources.get("train") is not None:
            model_change["train"] = str(o.resources["train"])
        # the chosen repair's file and folder inputs by content (masks, prompts, a segmenter or generator):
        # a rerun with other masks gave byte-identical provenance beside other weights
        digests = ctx.input_digests
        mine = {r.name for r in chosen.info.resources}
        if any(k in mine for k in digests):
            model_change["inputs"] = {k: {"sha256": v} for k, v in sorted(digests.items()) if k in mine}
        for k in ("settle", "masks", "data"):
            if diag.get(k) is not None:
                model_change[k] = diag[k]
    figures = {"before": _summary(before), "after": _summary(after)}
    code = provenance.code_identity()
    extra = {"model_change": model_change, "code": code}
    # every sample the model's lineage fitted or trained on: the repair set, a model repair's --train
    # samples, and the source's own record (a repaired model repaired again)
    reads = {r.name for r in chosen.info.resources} if trained else set()     # the chosen repair's inputs alone
    also = [_kept_samples(adapter, *v) for name, v in (trained_on or {}).items() if v and name in reads]
    record = provenance.samples_record(data, sample_keys, also=also,
                                       earlier=provenance.read(getattr(adapter, "source_metadata", None) or {}
                                                               ).get("samples"))
    if record is not None:
        extra["samples"] = record
    chain = provenance.lineage(getattr(adapter, "source_metadata", None),    # a repaired model repaired again
                               getattr(adapter, "source", None))
    if chain:
        extra["lineage"] = chain
    meta = provenance.build(source_sha256=adapter.source_sha256(), method=chosen.method, settings=settings,
                            figures=figures, measured_on=measured_on, extra=extra)

    result = {
        "model": {**adapter.describe(), "sha256": adapter.source_sha256()},
        "output": str(out_path),
        "recipe": recipe.name,
        "method": chosen.method,
        "kind": chosen.info.kind,
        "candidate": chosen.label,
        "settings": settings,
        "code": code,
        "selection_criterion": (f"{crit.describe(has_groups=enc.groups is not None)}, on {selection['scheme']}"
                                if selection else None),
        "candidates": choice.rows,
        "selection_notes": choice.notes,
        "diagnostics": final.diagnostics,
        "neurons_suppressed": (final.diagnostics or {}).get("neurons_suppressed"),
        "model_change": model_change,
        "artifacts": None,
        "measured_on": measured_on,
        "duplicates": dup_stats,
        "warnings": ctx.warnings,
        "before": before,
        "after": after,
        "export": None,
        "report": None,
    }

    # ---- write the model, its ONNX export, a model repair's files and the report: all or nothing
    onnx = None
    if o.export == "onnx":
        # a head repair's logits on the repair set are known from the cached embeddings: the
        # verification then needs no second PyTorch forward pass
        from .export import pick_verify_indices
        from .outputs import DEFAULT_MAX_VERIFY

        # verified on at most --max-verify samples of the repair set, picked as export and verify pick them
        idx = pick_verify_indices(len(data.items), o.max_verify or DEFAULT_MAX_VERIFY)
        ref = None
        if final.kind == "head":      # the head as written (a float16 checkpoint rounds it)
            Wh, bh = adapter.head_params()
            ref = X[torch.as_tensor(idx, dtype=torch.long)] @ Wh.T + bh
        onnx = OnnxExport(paths.get("--export onnx"), [data.items[i] for i in idx], tolerance=o.tolerance,
                          reference_logits=ref)
    keep = final.artifacts is not None and Path(final.artifacts).exists()
    report = None
    if o.report is not None:
        from .report import fix_document

        hist = _delta_histogram(X, y, W0, b0, enc.class_names)

        def build(written: dict) -> dict:
            return fix_document({**result, **_written(written)}, Path(model_path).name, hist)

        report = HtmlReport(Path(o.report), build)
    mo = ModelOutputs(adapter, meta, model=out_path, onnx=onnx,
                      artifacts=Path(final.artifacts) if keep else None,
                      artifacts_to=artifacts_output(model_path, out_path) if keep else None,
                      report=report, force=o.force, log=log)
    result["timing"] = {"embedding_seconds": round(emb.seconds, 4), "embedding_from_cache": emb.from_cache,
                        "fit_seconds": round(ctx.wall_seconds, 4),          # choosing and fitting, wall clock
                        "fit_seconds_summed": round(ctx.seconds, 4)}       # every fit's own time, added up
    result.update(_written(mo.write()))
    # a text model's ONNX written where no tokenizer is (an export beside a weights file, the repaired
    # ONNX model itself in another folder): say which files to put beside it
    onnx_at = [(result.get("export") or {}).get("path") if o.export == "onnx" else None,
               out_path if Path(out_path).suffix.lower() == ".onnx" else None]
    from .outputs import tokenizer_notice

    for at in dict.fromkeys(str(a) for a in onnx_at if a):
        notice = tokenizer_notice(adapter, Path(at))
        if notice:
            log(notice)
    adapter.adopt_provenance(meta)       # the model in memory is the one written: an export of it says so
    result["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 4)
    return result


def _written(w: dict) -> dict:
    return {"export": w.get("export"), "artifacts": w.get("artifacts"), "report": w.get("report")}


def _delta_histogram(X, y, W, b, class_names, bins: int = 30, top: int = 5) -> dict:
    from .probing import neuron_deltas
    from .report import histogram_of

    deltas, _ = neuron_deltas(X, y, (X @ W.T + b).argmax(1), W.shape[0])
    return histogram_of(deltas, class_names, bins=bins, top=top)


def _summary(rep: dict) -> dict:
    return {k: rep[k] for k in ("n", "accuracy", "worst_class_accuracy", "worst_group_accuracy")}
