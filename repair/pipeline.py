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
  training run each), the fit part is split once more: the best head repair (chosen by
  cross-validation on the first part) and every model repair are fitted on the first
  part and scored on the second; a chosen head repair is refitted on the whole fit
  part, a chosen model repair is kept as trained (its own early stopping already held
  out part of what it trained on).

A head repair's new head is written into the head; a model repair's changed tensors
(any of them) are written back by the adapter. Either way the output is the
checkpoint's own format, with provenance (method, settings, seed, the tensors that
changed, steps) and, with ``--export onnx``, a verified ONNX file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import provenance
from .adapters import LoadOptions, load_model
from .api import RuntimeOptions, prepare_data
from .data import DataOptions, Encoded
from .embeddings import extract, resolve_device
from .errors import BadInput
from .methods import ModelRepairInputs, RepairInputs
from .metrics import evaluate
from .selection import (MIN_FOR_CHOICE, MIN_FOR_REPORT, Criterion, Given, KFold, head_predictions,
                        inferred_group_names, inferred_groups, select_and_refit, stratified_split,
                        support_warnings)


@dataclass
class FixOptions:
    recipe: str = "auto"                  # built-in recipe name or a YAML path
    seed: int = 0
    report_fraction: float = 0.25         # held out for the reported figures when no eval data is given
    selection_folds: Optional[int] = None  # K of the cross-validation comparing head candidates (recipe's)
    model_holdout_fraction: float = 0.25  # share of the fit part scoring model repairs against heads
    eval_data: Optional[str] = None       # separate test set for before/after
    eval_group_by: Optional[str] = None   # group column of the eval data (default: --group-by)
    export: Optional[str] = None          # "onnx": also export and verify ONNX
    tolerance: Optional[float] = None     # ONNX verification tolerance override
    budget: Optional[str] = None          # model repairs: "300steps", "3epochs", "10min"
    # inputs of model repairs (each method checks the ones it uses): extra training data, foreground
    # masks, a local segmentation model, an image generator and its local model, prompts
    train_data: Optional[str] = None
    masks: Optional[str] = None
    segmenter: Optional[str] = None
    generator: Optional[str] = None
    generator_model: Optional[str] = None
    prompts: Optional[str] = None
    force: bool = False
    allow_finetune: bool = False          # recipe auto may escalate to a model repair (runs recipe auto-ft)

    def resources(self) -> dict:
        """The model-repair inputs the user gave (paths as Paths)."""
        out = {}
        from .preflight import RESOURCE_PATHS

        for key in RESOURCE_PATHS:
            v = getattr(self, key)
            if v is not None:
                out[key] = Path(v)
        if self.generator is not None:
            out["generator"] = self.generator
        return out


# ------------------------------------------------------------------- checks
def check_repair_set(enc: Encoded, num_classes: int, where) -> None:
    present = torch.unique(enc.y).tolist()
    if len(present) < 2:
        raise BadInput(f"the repair set has only one class ({enc.class_names[present[0]]}); "
                       "a head cannot be refit from it", where)
    if len(present) < num_classes:
        missing = [enc.class_names[c] for c in range(num_classes) if c not in present]
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise BadInput(f"the repair set covers {len(present)} of the model's {num_classes} classes "
                       f"(no samples of {shown}); the head cannot be refit for absent classes", where)
    if enc.groups is not None:
        # groups = class x attribute value: every combination must have samples
        attr_values = sorted({n.split("|", 1)[1] for n in enc.group_names})
        have = set(enc.group_names)
        for c in present:
            for a in attr_values:
                name = f"{enc.class_names[c]}|{a}"
                if name not in have:
                    raise BadInput(f"group {name} has no samples in the repair set", where)


def default_output(model_path: Path) -> Path:
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path.with_name(model_path.name + "-repaired")
    suffix = ".onnx" if model_path.suffix.lower() == ".onnx" else ".safetensors"
    return model_path.with_name(model_path.stem + "-repaired" + suffix)


# ------------------------------------------------------------------- fitting
@dataclass
class _Fitted:
    """One candidate fitted on some rows: a head, or a model repair's changed tensors."""
    kind: str
    W: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    tensors: Optional[dict] = None
    diagnostics: Optional[dict] = None
    config: Any = None
    steps: int = 0
    seconds: float = 0.0
    logits: Optional[torch.Tensor] = None      # model repairs: held-out logits, when scored
    artifacts: Optional[Path] = None           # model repairs: files to keep beside the output


class _Context:
    """What fitting a candidate needs: the fit part's embeddings and items, the original
    head, the groups, the seed, devices and the trainable model (made on first use)."""

    def __init__(self, adapter, data, X, y, groups, W0, b0, seed, device, budget, progress, log,
                 resources: Optional[dict] = None, workdir: Optional[Path] = None):
        self.adapter, self.data = adapter, data
        self.X, self.y, self.groups, self.W0, self.b0 = X, y, groups, W0, b0
        self.seed, self.device, self.budget, self.progress, self.log = seed, device, budget, progress, log
        self.resources = dict(resources or {})
        self.workdir = workdir
        self._tm = None
        self._runs = 0
        self.warnings: list[str] = []         # what the repair set is too small to support
        self.seconds = 0.0                     # time spent fitting, all candidates and folds

    @property
    def trainable(self):
        if self._tm is None:
            self._tm = self.adapter.trainable()
        return self._tm

    def fit(self, cand, idx: torch.Tensor, config=None) -> _Fitted:
        info, cfg = cand.info, (config if config is not None else cand.config())
        g = self.groups[idx] if (self.groups is not None and info.uses_groups) else None
        t0 = time.perf_counter()
        if info.kind == "head":
            out = info(RepairInputs(X=self.X[idx], y=self.y[idx], W=self.W0, b=self.b0, groups=g,
                                    seed=self.seed, device=self.device), cfg)
            secs = time.perf_counter() - t0
            self.seconds += secs
            return _Fitted("head", W=out.W, b=out.b, diagnostics=out.diagnostics, config=cfg, seconds=secs)
        tm = self.trainable
        start = tm.state()
        self._runs += 1
        work = None
        if self.workdir is not None:
            work = self.workdir / f"{self._runs:02d}-{info.name}"
            work.mkdir(parents=True)
        try:
            out = info(ModelRepairInputs(model=tm, items=[self.data.items[i] for i in idx.tolist()],
                                         y=self.y[idx], ref_logits=self.X[idx] @ self.W0.T + self.b0,
                                         groups=g, budget=self.budget, seed=self.seed, device=self.device,
                                         progress=self.progress, class_names=list(self.adapter.class_names),
                                         resources=self.resources, workdir=work), cfg)
        finally:
            tm.module.load_state_dict(start)        # every candidate starts from the original weights
        secs = time.perf_counter() - t0
        self.seconds += secs
        return _Fitted("model", tensors=out.tensors, diagnostics=out.diagnostics, config=cfg, steps=out.steps,
                       seconds=secs, artifacts=out.artifacts)

    def model_logits(self, fitted: _Fitted, idx: torch.Tensor) -> torch.Tensor:
        """Logits of a model repair's network on fit-part rows ``idx`` (then restored)."""
        tm = self.trainable
        start = tm.state(list(fitted.tensors))
        try:
            self.adapter.set_tensors(fitted.tensors)
            enc = tm.encode([self.data.items[i] for i in idx.tolist()])
            return tm.predict(enc, torch.arange(idx.numel()), torch.device(self.device))
        finally:
            self.adapter.set_tensors(start)


def _choose(recipe, ctx: _Context, fit_idx: torch.Tensor, strata: torch.Tensor, crit: Criterion,
            ref_logits: torch.Tensor, folds: int, model_holdout: float, seed: int, log):
    """(chosen candidate, its final fit, the candidate table, selection description)."""
    cands = recipe.candidates
    y = ctx.y[fit_idx]
    score_strata = crit.strata(y, ref_logits[fit_idx], ctx.groups[fit_idx] if ctx.groups is not None else None)
    rows: list[dict] = []

    def runnable(cs):
        out = []
        for c in cs:
            if c.info.needs_groups and ctx.groups is None:
                rows.append({"candidate": c.label, "kind": c.info.kind, "skipped": "needs group labels"})
            else:
                out.append(c)
        return out

    def head_cv(cs, rel: torch.Tensor):
        """Head candidates compared by K-fold CV on fit-part rows ``rel`` (positions in fit_idx):
        each is fitted once on all of ``rel`` (its own inner selection included); the folds refit
        it with the settings that selection chose (``MethodInfo.freeze``), far cheaper than
        repeating it. Returns (best index, selection, the fits on ``rel``)."""
        full = [ctx.fit(c, fit_idx[rel]) for c in cs]
        frozen = [c.info.freeze(f.config, f.diagnostics or {}) if c.info.freeze else f.config
                  for c, f in zip(cs, full)]
        secs = [f.seconds for f in full]

        def fit(idx, which):
            fs = []
            for i in which:
                f = ctx.fit(cs[i], fit_idx[rel[idx]], config=frozen[i])
                secs[i] += f.seconds
                fs.append(f)
            return fs

        sel = select_and_refit(len(cs), fit, lambda fs, idx: torch.stack(
            [head_predictions(ctx.X[fit_idx[rel[idx]]], f.W, f.b) for f in fs]), y[rel],
            criterion=crit, score_strata=score_strata[rel], split_strata=strata[rel],
            scheme=KFold(folds, recipe.repeats), seed=seed + 1, refit=False)
        for i, c in enumerate(cs):
            row = {"candidate": c.label, "kind": "head", "fit_seconds": round(secs[i], 4)}
            if sel.worst is not None:
                row.update({"score": float(sel.worst[i]), "selection_accuracy": float(sel.mean[i]),
                            "score_se": None if sel.worst_se is None else float(sel.worst_se[i]),
                            "scored_on": KFold(folds, recipe.repeats).describe()})
                log(f"  {c.label:<40} {folds}-fold {crit.name}={100 * sel.worst[i]:.1f}%  "
                    f"acc={100 * sel.mean[i]:.1f}%  ({secs[i]:.2f}s)")
            rows.append(row)
        return sel.best, sel, full

    heads = runnable([c for c in cands if c.info.kind == "head"])
    models = runnable([c for c in cands if c.info.kind == "model"])
    if not heads and not models:
        raise BadInput("no candidate of the recipe can run without group labels (give --group-by)")
    everything = torch.arange(fit_idx.numel())
    if not models:
        if len(heads) == 1:
            return heads[0], ctx.fit(heads[0], fit_idx), rows, None
        best, sel, full = head_cv(heads, everything)
        if sel.worst is None:
            return heads[best], full[best], rows, None
        _erm_check(ctx, sel, fit_idx, y, score_strata, crit)
        top = sel.ranked()[:max(1, int(recipe.ensemble))]
        if len(top) > 1:
            chosen, final = _ensemble([heads[i] for i in top], [full[i] for i in top], ctx.X[fit_idx])
            return chosen, final, rows, sel.describe()
        return heads[best], full[best], rows, sel.describe()
    if not heads and len(models) == 1:
        log(f"  {models[0].label}: training on the fit part ({fit_idx.numel()} samples)")
        f = ctx.fit(models[0], fit_idx)
        rows.append({"candidate": models[0].label, "kind": "model", "fit_seconds": round(f.seconds, 4),
                     "steps": f.steps})
        return models[0], f, rows, None

    # heads against model repairs: one more split of the fit part, scored on its held-out share
    part_a, part_h = stratified_split(strata, [model_holdout], seed + 2)
    finalists = []
    if heads:
        hb = head_cv(heads, part_a)[0] if len(heads) > 1 else 0
        finalists.append(heads[hb])
    finalists += models
    fitted: dict[int, _Fitted] = {}

    def fit(idx, which):
        for i in which:
            c = finalists[i]
            log(f"  {c.label}: fitting on {idx.numel()} samples to compare with the others")
            f = ctx.fit(c, fit_idx[idx])
            if f.kind == "model":
                f.logits = ctx.model_logits(f, fit_idx[part_h])
            fitted[i] = f
        return [fitted[i] for i in which]

    def predict(fs, idx):
        return torch.stack([head_predictions(ctx.X[fit_idx[idx]], f.W, f.b) if f.kind == "head"
                            else f.logits.argmax(1) for f in fs])

    sel = select_and_refit(len(finalists), fit, predict, y, criterion=crit, score_strata=score_strata,
                           scheme=Given(part_a, part_h), seed=seed + 2, refit=False)
    for i, c in enumerate(finalists):
        f = fitted[i]
        rows.append({"candidate": c.label, "kind": c.info.kind, "score": float(sel.worst[i]),
                     "selection_accuracy": float(sel.mean[i]), "fit_seconds": round(f.seconds, 4),
                     "steps": f.steps if f.kind == "model" else None,
                     "scored_on": f"held-out {round(100 * model_holdout)}% of the fit part"})
        log(f"  {c.label:<40} held-out {crit.name}={100 * sel.worst[i]:.1f}%  acc={100 * sel.mean[i]:.1f}%")
    chosen = finalists[sel.best]
    final = ctx.fit(chosen, fit_idx) if chosen.info.kind == "head" else fitted[sel.best]
    return chosen, final, rows, sel.describe()


@dataclass
class _Chosen:
    """What was chosen, as the report names it: a recipe candidate, or an average of several."""
    method: str
    label: str
    kind: str = "head"
    members: tuple = ()

    @property
    def info(self):
        return self


def _ensemble(cands, fits, X: torch.Tensor):
    """The average of the candidates' heads (``fits``, fitted on the whole fit part ``X``), each
    scaled to unit spread of its (class-centred) logits there, so no head dominates by its scale.
    Heads are linear in the embeddings: the average is one head, the logit average of the members."""
    Ws, bs = [], []
    for f in fits:
        lg = X @ f.W.T + f.b
        s = (lg - lg.mean(1, keepdim=True)).std().clamp_min(1e-8)
        Ws.append(f.W / s)
        bs.append(f.b / s)
    W, b = torch.stack(Ws).mean(0), torch.stack(bs).mean(0)
    label = " + ".join(c.label for c in cands)
    diag = {"ensemble": [c.label for c in cands], "members": {c.label: f.diagnostics for c, f in zip(cands, fits)}}
    config = {"ensemble": {c.label: dataclasses.asdict(f.config) for c, f in zip(cands, fits)}}
    return (_Chosen("ensemble", f"average of {label}", members=tuple(c.method for c in cands)),
            _Fitted("head", W=W, b=b, diagnostics=diag, config=config, seconds=0.0))


def _erm_check(ctx: _Context, sel, fit_idx, y, score_strata, crit) -> None:
    """Warn when no candidate beats the original head on the selection criterion (scored on the
    same fit-part rows): the repair set then gives no evidence that any repair helps."""
    from .selection import scores_from_preds

    erm, _ = scores_from_preds(head_predictions(ctx.X[fit_idx], ctx.W0, ctx.b0), y, score_strata)
    best = float(sel.worst[sel.best])
    if best <= float(erm[0]) + 1e-9:
        ctx.warnings.append(f"no candidate beats the original model on {crit.name} ({100 * best:.1f}% vs "
                            f"{100 * float(erm[0]):.1f}%): the repair set gives no evidence that a repair helps")


# ---------------------------------------------------------------------- main
def fix_model(model_path, data_path, out_path=None, *, load_opts: Optional[LoadOptions] = None,
              data_opts: Optional[DataOptions] = None, runtime: Optional[RuntimeOptions] = None,
              options: Optional[FixOptions] = None,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    from .modelrepair.finetune import Budget
    from .io import scratch_dir
    from .preflight import check_fix_inputs
    from .recipes import load_recipe

    t_start = time.perf_counter()
    o = options or FixOptions()
    runtime = runtime or RuntimeOptions()
    data_opts = data_opts or DataOptions()
    if o.allow_finetune and o.recipe not in ("auto", "auto-ft"):
        raise BadInput(f"--allow-finetune applies to --recipe auto, not {o.recipe!r}")
    recipe = load_recipe("auto-ft" if o.allow_finetune else o.recipe)
    budget = Budget.parse(o.budget)
    if o.export not in (None, "onnx"):
        raise BadInput(f"--export must be onnx, got {o.export!r}")
    out_path = Path(out_path) if out_path is not None else default_output(Path(model_path))
    repair_data = check_fix_inputs(model_path, data_path, out_path, o, data_opts, log=log)   # inputs readable, outputs writable

    resources = o.resources()
    if (resources or o.train_data) and "model" not in recipe.kinds:
        given = ", ".join(f"--{k.replace('_', '-')}" for k in [*resources, *(["train"] if o.train_data else [])])
        raise BadInput(f"{given}: inputs of model repairs, but recipe {recipe.name!r} has none")
    adapter = load_model(model_path, load_opts)
    if "model" in recipe.kinds and not adapter.can_train:
        adapter.trainable()                                   # raises BadInput naming the family
    for c in recipe.candidates:
        if c.info.kind == "model" and adapter.modality not in c.info.modalities:
            kinds = " or ".join(c.info.modalities)
            raise BadInput(f"{c.method} needs {'an' if kinds[0] in 'aeiou' else 'a'} {kinds} model; "
                           f"{Path(model_path).name} is {'an' if adapter.modality[0] in 'aeiou' else 'a'} "
                           f"{adapter.modality} model", Path(model_path))
    log(f"loaded {adapter.family} model {Path(model_path).name}: {len(adapter.class_names)} classes")

    data, enc, emb = prepare_data(adapter, repair_data, data_opts, runtime)
    where = data.table or data.source
    C = len(adapter.class_names)
    check_repair_set(enc, C, where)
    log(f"repair set: {len(data)} samples, embeddings {'from cache' if emb.from_cache else 'extracted'} "
        f"in {emb.seconds:.1f}s")
    W0, b0 = adapter.head_params()
    X, y, groups = emb.X, enc.y, enc.groups
    orig_logits = X @ W0.T + b0
    has_groups = groups is not None
    try:
        crit = Criterion.resolve(recipe.selection, has_groups=has_groups, y=y, ref_logits=orig_logits)
    except ValueError:
        raise BadInput(f"the recipe selects by {recipe.selection} but no --group-by was given") from None

    # ---- splits: strata = groups, else class x original correctness
    strata = groups if has_groups else inferred_groups(orig_logits, y)
    eval_given = o.eval_data is not None
    if eval_given:
        fit_idx, report_idx = torch.arange(len(y)), None
    else:
        fit_idx, report_idx = stratified_split(strata, [o.report_fraction], o.seed)
    fit_dev = str(resolve_device(runtime.device))
    # can this repair set support an honest choice and honest figures? say so when it cannot
    strata_names = list(enc.group_names) if has_groups else inferred_group_names(enc.class_names)
    warnings = []
    if len(recipe.candidates) > 1 or "model" in recipe.kinds:
        warnings += support_warnings(strata[fit_idx], strata_names, minimum=MIN_FOR_CHOICE,
                                     what="choosing between candidates" if len(recipe.candidates) > 1
                                     else "choosing when to stop training")
    if report_idx is not None and has_groups:
        warnings += support_warnings(groups[report_idx], strata_names, minimum=MIN_FOR_REPORT,
                                     what="the reported figures (held-out part of the repair set)")
    for w in warnings:
        log(f"warning: {w}")
    if o.train_data is not None:
        resources["train"] = _train_set(adapter, o.train_data, data_opts)
    if "model" in recipe.kinds:
        resources["data_root"] = Path(data.source)
        if has_groups:
            resources["group_names"] = list(enc.group_names)
    # model repairs get a scratch folder for the files they make (beside the output: the chosen one's
    # files are moved into place with it); it is removed whatever happens
    scratch = scratch_dir(out_path) if "model" in recipe.kinds else contextlib.nullcontext(None)
    with scratch as work:
        ctx = _Context(adapter, data, X, y, groups, W0, b0, o.seed, fit_dev, budget, runtime.progress, log,
                       resources=resources, workdir=None if work is None else Path(work))
        ctx.warnings = warnings
        folds = int(o.selection_folds or recipe.folds)
        chosen, final, candidates_report, selection = _choose(
            recipe, ctx, fit_idx, strata[fit_idx], crit, orig_logits, folds, o.model_holdout_fraction, o.seed, log)
        return _finish(o, recipe, chosen, final, candidates_report, selection, crit, adapter, data, enc, emb,
                       runtime, data_opts, fit_idx, report_idx, model_path, out_path, budget, ctx, t_start, log)


def _train_set(adapter, path, data_opts: DataOptions):
    """``--train`` data with labels matched to the model's classes (groups when the data has the
    --group-by column)."""
    from .api import check_modality
    from .data import encode, load_data
    from .methods import TrainSet

    opts = data_opts
    d = load_data(path, dataclasses.replace(opts, group_by=None))
    check_modality(adapter, d)
    gb = opts.group_by if opts.group_by in d.attributes else None
    e = encode(d, adapter.class_names, gb)
    return TrainSet(items=list(d.items), y=e.y, groups=e.groups, source=str(path))


def _finish(o, recipe, chosen, final, candidates_report, selection, crit, adapter, data, enc, emb, runtime,
            data_opts, fit_idx, report_idx, model_path, out_path, budget, ctx, t_start, log) -> dict:
    from .io import atomic_output

    X, y, groups = emb.X, enc.y, enc.groups
    has_groups = groups is not None
    W0, b0 = ctx.W0, ctx.b0
    eval_given = o.eval_data is not None
    if len(recipe.candidates) > 1:
        log(f"chosen: {chosen.label} by {crit.describe()}")

    # ---- the data the figures are measured on (never fitted or selected on)
    if eval_given:
        eval_group_by = o.eval_group_by if o.eval_group_by is not None else data_opts.group_by
        e_opts = dataclasses.replace(data_opts, group_by=eval_group_by)
        r_data, e_enc, e_emb = prepare_data(adapter, o.eval_data, e_opts, runtime)
        rX, ry, rg, rnames = e_emb.X, e_enc.y, e_enc.groups, e_enc.group_names
        measured_on = f"separate evaluation data ({len(r_data)} samples)"
    else:
        r_data = data.subset(report_idx.tolist())
        rX, ry = X[report_idx], y[report_idx]
        rg = groups[report_idx] if has_groups else None
        rnames = enc.group_names
        measured_on = (f"held-out {round(100 * o.report_fraction)}% of the repair set ({len(report_idx)} samples) "
                       "that no fitting or selection saw")
    before_logits = rX @ W0.T + b0

    # ---- apply the repair
    if final.kind == "head":
        adapter.set_head(final.W, final.b)
        after_logits = rX @ final.W.T + final.b
    else:
        adapter.set_tensors(final.tensors)
        log(f"measuring the repaired network on {len(r_data)} samples")
        W1, b1 = adapter.head_params()
        r_emb = extract(adapter, r_data, batch_size=runtime.batch_size, device=runtime.device,
                        cache_dir=runtime.cache_dir, use_cache=runtime.use_cache, progress=runtime.progress)
        after_logits = r_emb.X @ W1.T + b1
    before = evaluate(before_logits, ry, enc.class_names, rg, rnames)
    after = evaluate(after_logits, ry, enc.class_names, rg, rnames)
    if rg is None:  # label-free report: also show inferred groups of the report data (original model's)
        ig = inferred_groups(before_logits, ry)
        named = [f"{n} by original" for n in inferred_group_names(enc.class_names)]
        before["per_inferred_group"] = evaluate(before_logits, ry, enc.class_names, ig, named)["per_group"]
        after["per_inferred_group"] = evaluate(after_logits, ry, enc.class_names, ig, named)["per_group"]

    changed = adapter.changed_tensors()
    settings = {"recipe": recipe.name, "method": chosen.method, "kind": chosen.info.kind,
                "config": final.config if isinstance(final.config, dict) else dataclasses.asdict(final.config),
                "selection": selection and crit.name,
                "seed": o.seed, "group_labels": "given" if has_groups else "none",
                "splits": {"fit": int(fit_idx.numel()),
                           "selection": selection and selection.get("scheme"),
                           "report": int(report_idx.numel()) if report_idx is not None else 0}}
    model_change = {"changed_tensors": changed, "steps": final.steps,
                    "budget": budget.describe() if budget else None}
    figures = {"before": _summary(before), "after": _summary(after)}
    meta = provenance.build(source_sha256=adapter.source_sha256(), method=chosen.method, settings=settings,
                            figures=figures, measured_on=measured_on, extra={"model_change": model_change})

    # ---- write atomically (and export ONNX inside the same transaction)
    export_report = None
    artifacts_path, keep = None, False
    is_dir = Path(model_path).is_dir()
    with atomic_output(out_path, force=o.force) as tmp:  # tmp: the not-yet-existing output path
        written = adapter.save(tmp, provenance.merge(adapter.source_metadata, meta))
        keep = final.artifacts is not None and Path(final.artifacts).exists()
        if keep and is_dir:          # the files the chosen model repair made go inside a folder output
            shutil.move(str(final.artifacts), str(tmp / "repair-artifacts"))
            artifacts_path = out_path / "repair-artifacts"
        if o.export == "onnx" and not adapter.exports_onnx_natively:
            from .export import export_onnx

            # folder outputs carry model.onnx inside; a file output gets <stem>.onnx beside it.
            # A failed verification raises here, so neither file is left behind.
            onnx_path = (tmp / "model.onnx") if is_dir else out_path.with_suffix(".onnx")
            # a head repair's logits on the repair set are known from the cached embeddings: the
            # verification then needs no second PyTorch forward pass
            ref = (X @ final.W.T + final.b) if final.kind == "head" else None
            export_report = export_onnx(adapter, onnx_path, metadata=meta, verify_items=data.items,
                                        tolerance=o.tolerance, force=o.force, device="cpu", reference_logits=ref)
            export_report["path"] = str(out_path / "model.onnx") if is_dir else str(onnx_path)
        elif o.export == "onnx":
            from .export import verify_onnx

            export_report = verify_onnx(written, adapter, data.items, tolerance=o.tolerance)
            export_report["path"] = str(out_path)
    if keep and not is_dir:          # ... and beside a file output, once that is in place
        with atomic_output(out_path.with_name(out_path.stem + "-artifacts"), force=o.force, is_dir=True) as adir:
            for child in Path(final.artifacts).iterdir():
                shutil.move(str(child), str(adir / child.name))
        artifacts_path = out_path.with_name(out_path.stem + "-artifacts")

    return {
        "model": {**adapter.describe(), "sha256": adapter.source_sha256()},
        "output": str(out_path),
        "recipe": recipe.name,
        "method": chosen.method,
        "kind": chosen.info.kind,
        "candidate": chosen.label,
        "settings": settings,
        "selection_criterion": (f"{crit.describe()}, on {selection['scheme']}" if selection else None),
        "candidates": candidates_report,
        "diagnostics": final.diagnostics,
        "neurons_suppressed": (final.diagnostics or {}).get("neurons_suppressed"),
        "model_change": model_change,
        "artifacts": None if artifacts_path is None else str(artifacts_path),
        "measured_on": measured_on,
        "warnings": ctx.warnings,
        "before": before,
        "after": after,
        "export": export_report,
        "timing": {"embedding_seconds": round(emb.seconds, 4), "embedding_from_cache": emb.from_cache,
                   "fit_seconds": round(ctx.seconds, 4),
                   "total_seconds": round(time.perf_counter() - t_start, 4)},
    }


def _summary(rep: dict) -> dict:
    return {k: rep[k] for k in ("n", "accuracy", "worst_class_accuracy", "worst_group_accuracy")}
