"""Choosing among a recipe's candidates on the fit part of the repair set (``repair fix``).

One criterion (:class:`repair.selection.Criterion`) and one scheme decide every choice:

- **Head repairs** are compared by repeated K-fold cross-validation (every fit-part sample
  scored by a head that did not see it, the whole cross-validation repeated on new folds and
  averaged). Each head method is fitted once on the whole fit part (its own inner selection
  included); the folds refit it with the settings that selection chose
  (``MethodInfo.freeze``). With ``ensemble: 2`` the best two heads are averaged (heads are
  linear: the average folds into one head).
- **Model repairs** (a training run each) are compared with the heads *on the same folds*: the
  first repeat's K folds, out-of-fold predictions, the same criterion. The heads' side is exactly
  the head the recipe would return without model repairs (its members refitted per fold), so
  when a head wins, the result is that head: a recipe with model repairs cannot return a worse
  head than the same recipe without them. A model repair is chosen only when it scores higher by
  two standard errors of the head's worst-stratum accuracy (and at least a point:
  :func:`repair.selection.required_gain`); it is then trained once more on the whole fit part.
- **A model repair that cross-fits** over as many folds as the recipe's (mixft's ``cross_fit: k``;
  recipe ``auto-ft``) is run *once* with those folds as its own: member ``j`` trains on every fold but
  ``j``, each row is predicted by the member that did not train on it (``Fitted.oof_pred``), and
  those out-of-fold predictions are scored as above. When it wins, its members' average is the model:
  no further training (the fold-by-fold path trains K + 1 times).
- **Escalation is skipped** when it cannot win: when the returned head's out-of-fold criterion
  plus the gain a model repair needs is above 100% (the report says so).
- **A model repair stops after a fold** when it can no longer win: its criterion with every row
  the remaining folds will predict counted as right is below the head's score plus the gain it
  needs. The choice is the one all folds would give; the remaining trainings are not run. A
  cross-fitting repair is bounded the same way after each member but the last, at the best of every
  point its settling could still choose (each interpolation weight, head and strength:
  ``ModelRepairInputs.stop_check``, :class:`repair.methods.CannotWin`); the members not yet trained
  are not. (This
  replaced a rule that skipped escalation when the head's criterion was within a point of its
  accuracy -- "no group left behind" -- which could not tell an even but capped head, one that only
  a changed network can lift, from a good one: ``bench/analysis.md``.)
"""
from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import threads
from .display import percent
from .config import SettingRefused
from .errors import BadInput, no_warnings
from .methods import CannotWin, FoldInputs, ModelRepairInputs, RepairInputs
from .selection import (MIN_GAIN, Criterion, KFold, average_heads, head_predictions, inferred_groups,
                        required_gain, scores_from_preds, select_and_refit)


@dataclass
class Fitted:
    """One candidate fitted on some rows: a head, or a model repair's changed tensors."""
    kind: str
    W: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    tensors: Optional[dict] = None
    diagnostics: Optional[dict] = None
    config: Any = None
    steps: int = 0
    seconds: float = 0.0
    artifacts: Optional[Path] = None           # model repairs: files to keep beside the output
    oof_pred: Optional[torch.Tensor] = None    # a cross-fitted model repair: each row's out-of-fold prediction


@dataclass
class Chosen:
    """What was chosen, as the report names it: a recipe candidate, or an average of several."""
    method: str
    label: str
    kind: str = "head"
    members: tuple = ()

    @property
    def info(self):
        return self


@dataclass
class Choice:
    """The outcome: what was chosen, its fit on the whole fit part, one row per candidate, and
    how the choice was made (None when there was nothing to choose)."""
    chosen: Any
    final: Fitted
    rows: list = field(default_factory=list)
    selection: Optional[dict] = None
    notes: list = field(default_factory=list)
    #: what the repair set is too small to support or gives no evidence of (:func:`choose_heads`; a
    #: ``repair fix`` report carries them with its other warnings)
    warnings: list = field(default_factory=list)


def not_compared(label: str) -> str:
    """The warning of a recipe with several candidates whose fit part was too small for its folds."""
    return f"no candidate was compared (too few samples for the folds): {label} is the recipe's first"


class FitContext:
    """What fitting a candidate needs: the fit part's embeddings and items, the original head, the
    groups, duplicate clusters, the seed, devices and the trainable model (made on first use)."""

    def __init__(self, adapter, data, X, y, groups, W0, b0, seed, device, budget, progress, log,
                 resources: Optional[dict] = None, workdir: Optional[Path] = None,
                 clusters: Optional[torch.Tensor] = None):
        self.adapter, self.data = adapter, data
        self.X, self.y, self.groups, self.W0, self.b0 = X, y, groups, W0, b0
        self.seed, self.device, self.budget, self.progress, self.log = seed, device, budget, progress, log
        self.resources = dict(resources or {})
        self.workdir = workdir
        self.clusters = clusters
        self._tm = None
        self._runs = 0
        self.warnings: list[str] = []         # what the repair set is too small to support
        #: what it is too small to support of a lone head method's own choice among its settings:
        #: said once its fit shows it had several to choose from
        self.inner_choice_warnings: list[str] = []
        #: the model repairs' file and folder inputs by content (``provenance.input_digest``), read before
        #: any work; the chosen repair's are recorded
        self.input_digests: dict = {}
        self.seconds = 0.0                     # time spent fitting, all candidates and folds (summed)
        self._lock = threading.Lock()          # head fits may run side by side (threads.map_tasks)
        self.wall_seconds = 0.0                # choosing and fitting, wall clock (set by the caller)

    @property
    def trainable(self):
        if self._tm is None:
            self._tm = self.adapter.trainable()
        return self._tm

    def fit(self, cand, idx: torch.Tensor, config=None, folds: Optional[list] = None,
            stop_check: Optional[Callable] = None) -> Fitted:
        """``cand`` fitted on rows ``idx``; ``folds`` (model repairs): ``[(train, held), ...]`` positions
        within ``idx`` that a cross-fitting repair takes as its folds (``ModelRepairInputs.folds``), and
        ``stop_check`` its bound after each member (``ModelRepairInputs.stop_check``: a repair that
        stops raises :class:`repair.methods.CannotWin`, its ``seconds`` set here)."""
        info, cfg = cand.info, (config if config is not None else cand.config())
        g = self.groups[idx] if (self.groups is not None and info.uses_groups) else None
        t0 = time.perf_counter()
        if info.kind == "head":
            out = info(FoldInputs(X=self.X[idx], y=self.y[idx], W=self.W0, b=self.b0, groups=g,
                                    seed=self.seed, device=self.device,
                                    clusters=None if self.clusters is None else self.clusters[idx]), cfg)
            secs = time.perf_counter() - t0
            with self._lock:
                self.seconds += secs
            return Fitted("head", W=out.W, b=out.b, diagnostics=out.diagnostics, config=cfg, seconds=secs)
        tm = self.trainable
        start = tm.state()
        self._runs += 1
        work = None
        if self.workdir is not None:
            work = self.workdir / f"{self._runs:02d}-{info.name}"
            work.mkdir(parents=True)
        extra = {} if self.clusters is None else {"duplicates": self.clusters[idx]}
        try:
            out = info(ModelRepairInputs(model=tm, items=[self.data.items[i] for i in idx.tolist()],
                                         y=self.y[idx], ref_logits=self.X[idx] @ self.W0.T + self.b0,
                                         groups=g, budget=self.budget, seed=self.seed, device=self.device,
                                         progress=self.progress, class_names=list(self.adapter.class_names),
                                         resources=self.resources, workdir=work, folds=folds,
                                         stop_check=stop_check, **extra), cfg)
        except CannotWin as e:
            e.seconds = time.perf_counter() - t0
            self.seconds += e.seconds
            raise
        finally:
            tm.module.load_state_dict(start)        # every candidate starts from the original weights
        secs = time.perf_counter() - t0
        self.seconds += secs
        return Fitted("model", tensors=out.tensors, diagnostics=out.diagnostics, config=cfg, steps=out.steps,
                      seconds=secs, artifacts=out.artifacts, oof_pred=out.oof_pred)

    def model_logits(self, fitted: Fitted, idx: torch.Tensor) -> torch.Tensor:
        """Logits of a model repair's network on rows ``idx`` (the original weights restored after)."""
        tm = self.trainable
        start = tm.state(list(fitted.tensors))
        try:
            self.adapter.set_tensors(fitted.tensors)
            enc = tm.encode([self.data.items[i] for i in idx.tolist()])
            return tm.predict(enc, torch.arange(idx.numel()), torch.device(self.device))
        finally:
            self.adapter.set_tensors(start)


def ensemble(cands, fits, X: torch.Tensor):
    """The average of the candidates' heads (``fits``, fitted on rows whose embeddings are
    ``X``), each scaled to unit spread of its (class-centred) logits there, so no head dominates
    by its scale. Heads are linear in the embeddings: the average is one head."""
    W, b = average_heads(torch.stack([f.W for f in fits]), torch.stack([f.b for f in fits]), X)
    label = " + ".join(c.label for c in cands)
    diag = {"ensemble": [c.label for c in cands], "members": {c.label: f.diagnostics for c, f in zip(cands, fits)}}
    config = {"ensemble": {c.label: dataclasses.asdict(f.config) for c, f in zip(cands, fits)}}
    return (Chosen("ensemble", f"average of {label}", members=tuple(c.method for c in cands)),
            Fitted("head", W=W, b=b, diagnostics=diag, config=config, seconds=0.0))


def _erm_check(ctx: FitContext, sel, fit_idx, y, score_strata, crit) -> None:
    """Warn when no candidate beats the original head on the selection criterion (scored on the
    same fit-part rows): the repair set then gives no evidence that any repair helps."""
    erm, _ = scores_from_preds(head_predictions(ctx.X[fit_idx], ctx.W0, ctx.b0), y, score_strata)
    best = float(sel.worst[sel.best])
    if best <= float(erm[0]) + 1e-9:
        ctx.warnings.append(f"no candidate beats the original model on {crit.name} ({percent(best)} vs "
                            f"{percent(float(erm[0]))}): the repair set gives no evidence that a repair helps")
        ctx.log(f"warning: {ctx.warnings[-1]}")     # on stderr with the others, not only in the results


def selection_basis(selection: str, y: torch.Tensor, ref_logits: torch.Tensor,
                    groups: Optional[torch.Tensor]) -> tuple[Criterion, torch.Tensor]:
    """What a recipe's choice is made by: its criterion (:meth:`Criterion.resolve` of the recipe's
    ``selection``; :class:`BadInput` when it needs group labels that were not given) and the strata
    every split is stratified by: the group labels, else the original model's inferred groups (class
    x correctly classified; ``ref_logits`` its logits)."""
    has_groups = groups is not None
    try:
        crit = Criterion.resolve(selection, has_groups=has_groups, y=y, ref_logits=ref_logits)
    except BadInput:
        raise BadInput(f"the recipe selects by {selection} but no --group-by was given") from None
    return crit, (groups if has_groups else inferred_groups(ref_logits, y))


def choose_heads(recipe, X: torch.Tensor, y: torch.Tensor, W0: torch.Tensor, b0: torch.Tensor,
                 groups: Optional[torch.Tensor] = None, *, seed: int = 0, device: str = "cpu",
                 folds: Optional[int] = None, clusters: Optional[torch.Tensor] = None,
                 log: Optional[Callable[[str], None]] = None) -> Choice:
    """A recipe of head repairs chosen and fitted on embeddings alone (arrays in, a head out; no
    model, no files): what ``repair fix`` does once the embeddings are extracted, with every row in
    the fit part (as with ``--eval``). ``recipe``: a name, a path or a loaded recipe; ``X`` (N, D)
    embeddings, ``y`` (N,) labels, ``W0``/``b0`` the original head, ``groups`` (N,) group ids or
    None (label-free), ``clusters`` ids of identical samples (kept in one fold). Returns the
    :class:`Choice`: ``final.W`` / ``final.b`` the head, ``rows`` every candidate's score. The arrays
    (numpy arrays, tensors or lists) are checked by the rules of every head repair's inputs
    (:func:`repair.methods.check_inputs`, which a method called directly applies too): arrays of the
    wrong shape or kind (labels that are not the head's class indices -- label names included --,
    groups or clusters that are not whole ids from 0 up (ids of any size are the same partition as
    compact ones: see check_inputs), no rows, values that are not finite in
    float32, what the fits compute in) raise :class:`repair.methods.BadArrays`, a ValueError and a
    :class:`repair.errors.BadInput`; ``folds`` (2 to 20), ``device`` and ``seed`` are checked as the
    CLI's options are (:class:`repair.errors.BadInput`)."""
    from .recipes import load_recipe

    if not hasattr(recipe, "candidates"):
        recipe = load_recipe(recipe)
    if "model" in recipe.kinds:
        raise ValueError(f"recipe {recipe.name!r} has model repairs: they need the model "
                         "(repair.pipeline.fix_model)")
    from .methods import BadArrays, RepairInputs, check_inputs
    from .recipes import check_folds

    def tensor(name, v):
        if v is None or isinstance(v, torch.Tensor):
            return v
        if isinstance(v, np.ndarray) and any(s < 0 for s in v.strides):
            v = np.ascontiguousarray(v)         # a reversed view (X[::-1]): torch reads only a copy of it
        if not isinstance(v, (np.ndarray, np.generic, list, tuple)):
            if hasattr(v, "toarray"):          # a scipy sparse matrix: its dense copy is the caller's call
                raise BadArrays(f"choose_heads: {name} must be a dense array or tensor, got "
                                f"{type(v).__module__.split('.')[0]}.{type(v).__name__} (pass .toarray())")
            if callable(getattr(v, "to_numpy", None)):
                # a DataFrame, Series or Index (pandas, polars, xarray): its values (torch iterated a
                # DataFrame by its column names: KeyError deep inside)
                v = v.to_numpy()
        try:
            with no_warnings():
                # a read-only array (pandas' values) is shared, never written: torch's warning about
                # writing to it does not apply
                return torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError):       # strings, ragged lists, objects
            kind = "class indices" if name == "y" else "ids" if name in ("groups", "clusters") else "numbers"
            got = f"{type(v).__name__}{f' of {v.dtype}' if hasattr(v, 'dtype') else ''}"
            raise BadArrays(f"choose_heads: {name} must be an array or tensor of {kind}, got {got}"
                            + ("; map label names to the head's class indices first" if name == "y" else "")
                            ) from None

    # the arrays are checked as a head repair's inputs are (one home: repair.methods.check_inputs), in
    # the caller's dtypes (X's finiteness as the float32 the fits compute in)
    arrays = {k: tensor(k, v) for k, v in (("X", X), ("y", y), ("W0", W0), ("b0", b0), ("groups", groups),
                                           ("clusters", clusters))}
    checked = check_inputs(RepairInputs(X=arrays["X"], y=arrays["y"], W=arrays["W0"], b=arrays["b0"],
                                        groups=arrays["groups"], clusters=arrays["clusters"], seed=seed,
                                        device=device), "choose_heads", names={"W": "W0", "b": "b0"})
    X, W0, b0 = arrays["X"].float(), arrays["W0"].float(), arrays["b0"].float()
    y, groups, clusters = checked.y, checked.groups, checked.clusters     # int64; ids >= N renumbered
    from .data import check_classes_present

    try:
        check_classes_present(y, [str(c) for c in range(W0.shape[0])])     # as repair fix refuses it
    except BadInput as e:                  # an array's problem: BadArrays, as a method call raises it
        raise BadArrays(f"choose_heads: {e.problem}") from None
    folds = recipe.folds if folds is None else check_folds(folds)
    log = log or (lambda m: None)
    ref_logits = X @ W0.T + b0
    crit, strata = selection_basis(recipe.selection, y, ref_logits, groups)
    ctx = FitContext(None, None, X, y, groups, W0, b0, seed, device, None, False, log, clusters=clusters)
    choice = choose(recipe, ctx, torch.arange(y.numel()), strata, crit, ref_logits, int(folds), seed, log)
    if len(recipe.candidates) > 1 and not choice.selection:
        ctx.warnings.append(not_compared(choice.chosen.label))
        log(f"warning: {ctx.warnings[-1]}")
    choice.warnings = list(ctx.warnings)       # a caller without a log keeps them (the default log drops all)
    return choice


def choose(recipe, ctx: FitContext, fit_idx: torch.Tensor, strata: torch.Tensor, crit: Criterion,
           ref_logits: torch.Tensor, folds: int, seed: int, log: Callable[[str], None]) -> Choice:
    """Choose among ``recipe``'s candidates on the fit part (rows ``fit_idx``; ``strata`` the
    split strata of those rows) by ``crit`` (see the module docstring)."""
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

    heads = runnable([c for c in recipe.candidates if c.info.kind == "head"])
    models = runnable([c for c in recipe.candidates if c.info.kind == "model"])
    if not heads and not models:
        raise BadInput("no candidate of the recipe can run without group labels (give --group-by)")
    clusters = None if ctx.clusters is None else ctx.clusters[fit_idx]      # identical samples share a fold
    scheme = KFold(folds, recipe.repeats, clusters=clusters)

    # ---- the heads, exactly as the recipe without model repairs would choose them
    head = None            # (chosen, final fit on the whole fit part, selection, its members' indices)
    if heads:
        # independent fits on a small repair set run side by side, one torch thread each
        workers = threads.workers_for(len(heads), float(fit_idx.numel()) * ctx.X.shape[1], ctx.device)
        if len(heads) == 1:
            head = (heads[0], ctx.fit(heads[0], fit_idx), None, [0])
        else:
            full: list = [None] * len(heads)
            secs = [0.0] * len(heads)

            def frozen(i, f):
                c = heads[i]
                return c.info.freeze(f.config, f.diagnostics or {}) if c.info.freeze else f.config

            def fit_folds(trains, which):
                # each head's fit on the whole fit part (it fixes the settings its fold fits reuse),
                # then its fit on every training set of every repeat; side by side, a head's fold fits
                # start when its own whole fit is done (mix's averaged refits cost several dfr fits)
                # (a head already fitted on the whole fit part, the further repeats of the candidates
                # still in contention, keeps that fit)
                which = list(which)
                then = [lambda i, f, t=t: ctx.fit(heads[i], fit_idx[t], config=frozen(i, f)) for t in trains]
                fresh = {i for i in which if full[i] is None}
                firsts, thens = threads.map_chains(lambda i: ctx.fit(heads[i], fit_idx) if i in fresh else full[i],
                                                   then, which, workers)
                for i, f, fs in zip(which, firsts, thens):
                    full[i] = f
                    secs[i] += (f.seconds if i in fresh else 0.0) + sum(g.seconds for g in fs)
                return [[thens[n][k] for n in range(len(which))] for k in range(len(trains))]

            sel = select_and_refit(len(heads), lambda idx, which: fit_folds([idx], which)[0],
                                   lambda fs, idx: torch.stack([head_predictions(ctx.X[fit_idx[idx]], f.W, f.b)
                                                                for f in fs]), y,
                                   criterion=crit, score_strata=score_strata, split_strata=strata,
                                   scheme=scheme, seed=seed + 1, refit=False, fit_folds=fit_folds,
                                   contend=max(1, int(recipe.ensemble)))
            missing = [i for i, f in enumerate(full) if f is None]
            if missing:                  # nothing was cross-validated (too few rows): the whole fits alone
                for i, f in zip(missing, threads.map_tasks(lambda i: ctx.fit(heads[i], fit_idx), missing, workers)):
                    full[i], secs[i] = f, secs[i] + f.seconds
            for i, c in enumerate(heads):
                row = {"candidate": c.label, "kind": "head", "fit_seconds": round(secs[i], 4)}
                if sel.worst is not None:
                    one = i in sel.dropped              # scored on the first repeat only
                    row.update({"score": float(sel.worst[i]), "selection_accuracy": float(sel.mean[i]),
                                "score_se": None if sel.worst_se is None or one else float(sel.worst_se[i]),
                                "scored_on": scheme.describe() if not one else
                                f"{scheme.describe()}: the first repeat only ({sel.dropped[i]})"})
                    if one:
                        row["out_of_contention"] = sel.dropped[i]
                    log(f"  {c.label:<40} {folds}-fold {crit.name}={percent(sel.worst[i])}  "
                        f"acc={percent(sel.mean[i])}  ({secs[i]:.2f}s)")
                rows.append(row)
            if sel.worst is None:
                head = (heads[sel.best], full[sel.best], None, [sel.best])
            else:
                _erm_check(ctx, sel, fit_idx, y, score_strata, crit)
                top = sel.ranked()[:max(1, int(recipe.ensemble))]
                if len(top) > 1:
                    chosen, final = ensemble([heads[i] for i in top], [full[i] for i in top], ctx.X[fit_idx])
                else:
                    chosen, final = heads[top[0]], full[top[0]]
                head = (chosen, final, sel, top)
    if not models:
        chosen, final, sel, _ = head
        return Choice(chosen, final, rows, None if sel is None or sel.worst is None else sel.describe())
    if head is None and len(models) == 1:
        log(f"  {models[0].label}: training on the fit part ({fit_idx.numel()} samples)")
        f = ctx.fit(models[0], fit_idx)
        rows.append({"candidate": models[0].label, "kind": "model", "fit_seconds": round(f.seconds, 4),
                     "steps": f.steps, **_stop_info(f)})
        return Choice(models[0], f, rows, None)
    return _escalate(recipe, ctx, fit_idx, strata, crit, y, score_strata, head, heads, models, rows, scheme,
                     seed, log)


def stopped_by(f: Fitted):
    """What ended a model repair's training (its loop's diagnostics), or None."""
    loop = (f.diagnostics or {}).get("loop") or {}
    return loop.get("stopped_by")


def _stop_info(f: Fitted) -> dict:
    s = stopped_by(f)
    return {"stopped_by": s} if s else {}


def _escalate(recipe, ctx, fit_idx, strata, crit, y, score_strata, head, heads, models, rows, scheme, seed,
              log) -> Choice:
    """Model repairs against the head the recipe would return, on the same folds (see the module
    docstring)."""
    parts = None
    head_pred = None
    notes: list[str] = []
    if head is not None:
        chosen_h, final_h, sel, top = head
        if sel is not None and sel.folds:
            parts = sel.folds                       # the first repeat's held-out folds
            head_pred = torch.empty(y.numel(), dtype=torch.long)
            for fold_fits, held in zip(sel.fold_fits, parts):
                train = torch.ones(y.numel(), dtype=torch.bool)
                train[held] = False
                members = [fold_fits[i] for i in top]
                if len(members) > 1:
                    _, f = ensemble([heads[i] for i in top], members, ctx.X[fit_idx[train]])
                else:
                    f = members[0]
                head_pred[held] = head_predictions(ctx.X[fit_idx[held]], f.W, f.b)
    if parts is None:
        # nothing cross-validated the heads (one head): make the folds here, the same way
        from .selection import kfold_parts

        parts = next(iter(kfold_parts(KFold(scheme.folds, 1, clusters=scheme.clusters), strata, seed + 1)), [])
        if not parts:
            why = f"too few samples ({y.numel()}) in the fit part for {scheme.folds} folds"
            if head is None:
                raise BadInput(f"cannot compare the model repairs: {why}")
            notes.append(f"model repairs skipped: {why}")
            log(f"  model repairs skipped: {why}")
            rows.extend({"candidate": c.label, "kind": "model", "skipped": why} for c in models)
            return Choice(head[0], head[1], rows, None, notes)
        if head is not None:
            head_pred = torch.empty(y.numel(), dtype=torch.long)
            for held in parts:
                train = torch.ones(y.numel(), dtype=torch.bool)
                train[held] = False
                f = ctx.fit(head[0], fit_idx[train.nonzero().flatten()])
                head_pred[held] = head_predictions(ctx.X[fit_idx[held]], f.W, f.b)
    fold_desc = f"the same {len(parts)} folds (out-of-fold predictions)"
    best_score, best_mean, best = None, None, None
    need = MIN_GAIN
    if head_pred is not None:
        w, m = scores_from_preds(head_pred[None], y, score_strata)
        best_score, best_mean, best = float(w[0]), float(m[0]), ("head", None)
        need = required_gain(head_pred, y, score_strata)
        rows.append({"candidate": head[0].label, "kind": "head", "score": best_score,
                     "selection_accuracy": best_mean, "scored_on": fold_desc, "role": "head to beat",
                     "required_gain": need})
        log(f"  head to beat: {head[0].label}  {crit.name}={percent(best_score)}  acc={percent(best_mean)}")
        if best_score + need > 1.0 + 1e-12:
            why = (f"the head's out-of-fold {crit.name} ({percent(best_score)}) plus the {100 * need:.1f} points "
                   f"a model repair must gain is above 100%: no model repair can win")
            notes.append(f"model repairs skipped: {why}")
            log(f"  model repairs skipped: {why}")
            for c in models:
                rows.append({"candidate": c.label, "kind": "model", "skipped": why})
            return Choice(head[0], head[1], rows, _describe(crit, fold_desc, len(y)), notes)
    head_score = best_score                     # None when there is no head to beat
    fitted: dict = {}                           # a cross-fitted candidate's run: it is also its final model
    cut_runs: dict = {}                         # each model candidate's loop record (its first fold's)

    def skip(cand, why: str) -> None:           # a model repair that could not be compared: the head stays
        rows.append({"candidate": cand.label, "kind": "model", "skipped": why})
        notes.append(f"{cand.label} skipped: {why}")
        log(f"  {cand.label}: skipped, {why}")

    for c in models:
        # rows no fold has predicted yet count as right: until the last fold, the criterion of `pred`
        # is the most the candidate can still score (a bound, exact once every fold is in)
        pred = y.clone().long()
        secs, steps, stops, bound, unfit = 0.0, 0, [], None, None
        at_most: list = []
        calls: list = []

        def stop_check(rows_idx: torch.Tensor, points: torch.Tensor) -> Optional[str]:
            # the cross-fitted members so far predict their folds' rows at every point the run could end
            # at; the rows still to predict count as right: the most the finished run can score
            calls.append(1)
            P = points.shape[0]
            full = y.long().view(1, -1).repeat(P, 1)
            full[:, rows_idx.long().cpu()] = points.long().cpu()
            best = float(scores_from_preds(full, y, score_strata)[0].max())
            if best >= head_score + need - 1e-12:
                return None
            at_most.append(best)
            return (f"cannot beat the head: after {len(calls)} of {len(parts)} cross-fitted members its "
                    f"{crit.name} is at most {percent(best)} (at the best of the {P} points settling "
                    f"could choose, every row still to predict right), below the {percent(head_score + need)} "
                    f"it needs")

        crossed = (_cross_fitted(c, ctx, fit_idx, parts, y, log, stop_check if head_score is not None else None)
                   if _cross_fits(c, parts) else None)
        if isinstance(crossed, CannotWin):
            cut_runs[c.label] = crossed.loop
            rows.append({"candidate": c.label, "kind": "model", "score_at_most": at_most[-1],
                         "fit_seconds": round(crossed.seconds, 4), "steps": crossed.steps,
                         "scored_on": f"{crossed.members} of {fold_desc}; cross-fitted", "stopped": crossed.reason})
            log(f"  {c.label}: stopped, {crossed.reason}  ({crossed.seconds:.1f}s)")
            continue
        if isinstance(crossed, BadInput):
            if head_score is None or isinstance(crossed, SettingRefused):   # the user's error, not the fold's
                raise crossed
            skip(c, f"cannot be cross-fitted on these {len(parts)} folds ({crossed.problem}); the head stays")
            continue
        if crossed is not None:
            cut_runs[c.label] = (crossed.diagnostics or {}).get("loop")
        if crossed is not None and ((crossed.diagnostics or {}).get("settle") or {}).get("body") == "original":
            # every member kept its start, or settling chose the original body: what is left is a head
            # refitted on the original body, its strength chosen on these very out-of-fold predictions --
            # a head repair, scored with an edge the heads are not given: not a model repair to compare
            skip(c, "its cross-fitted members kept the original body (no training step beat the start, or "
                    "settling chose the original body): a head repair, which the heads cover; the head stays")
            continue
        if crossed is not None:
            fitted[id(c)] = crossed
            w, m = scores_from_preds(crossed.oof_pred[None], y, score_strata)
            score, mean = float(w[0]), float(m[0])
            loop = (crossed.diagnostics or {}).get("loop") or {}
            member_stops = (loop.get("budget") or {}).get("member_stopped_by") or []
            rows.append({"candidate": c.label, "kind": "model", "score": score, "selection_accuracy": mean,
                         "fit_seconds": round(crossed.seconds, 4), "steps": crossed.steps,
                         "scored_on": f"{fold_desc}; cross-fitted: each fold predicted by the member that did "
                                      f"not train on it",
                         **({"stopped_by": member_stops} if any(member_stops) else {})})
            log(f"  {c.label:<40} {crit.name}={percent(score)}  acc={percent(mean)}  ({crossed.seconds:.1f}s, "
                f"cross-fitted)")
            beats_head = head_score is None or score >= head_score + need
            if beats_head and (best is None or best[0] == "head" or (score, mean) > (best_score, best_mean)):
                best_score, best_mean, best = score, mean, ("model", c)
            continue
        for k, held in enumerate(parts):
            train = torch.ones(y.numel(), dtype=torch.bool)
            train[held] = False
            log(f"  {c.label}: fold {k + 1}/{len(parts)}, training on {int(train.sum())} samples")
            try:
                f = ctx.fit(c, fit_idx[train.nonzero().flatten()])
            except BadInput as e:
                # nothing to fall back on, or a setting the model refuses (a scope matching none of its
                # parameters) whatever the fold: the user's error
                if head_score is None or isinstance(e, SettingRefused):
                    raise
                unfit = e.problem               # a fold too small for it: the head stays, as auto returns it
                break
            pred[held] = ctx.model_logits(f, fit_idx[held]).argmax(1)
            cut_runs.setdefault(c.label, (f.diagnostics or {}).get("loop"))
            secs, steps = secs + f.seconds, steps + f.steps
            stops.append(stopped_by(f))
            if head_score is not None and k + 1 < len(parts):
                at_most = float(scores_from_preds(pred[None], y, score_strata)[0][0])
                if at_most < head_score + need - 1e-12:
                    bound = (k + 1, at_most)
                    break
        if unfit is not None:
            skip(c, f"cannot be trained on a fold of {int(train.sum())} samples ({unfit}); the head stays")
            continue
        if bound is not None:
            why = (f"cannot beat the head: after {bound[0]} of {len(parts)} folds its {crit.name} is at most "
                   f"{percent(bound[1])} (every row still to predict right), below the "
                   f"{percent(head_score + need)} it needs")
            rows.append({"candidate": c.label, "kind": "model", "score_at_most": bound[1],
                         "fit_seconds": round(secs, 4), "steps": steps,
                         "scored_on": f"{bound[0]} of {fold_desc}", "stopped": why,
                         **({"stopped_by": stops} if any(stops) else {})})
            log(f"  {c.label}: stopped, {why}  ({secs:.1f}s)")
            continue
        w, m = scores_from_preds(pred[None], y, score_strata)
        score, mean = float(w[0]), float(m[0])
        rows.append({"candidate": c.label, "kind": "model", "score": score, "selection_accuracy": mean,
                     "fit_seconds": round(secs, 4), "steps": steps, "scored_on": fold_desc,
                     **({"stopped_by": stops} if any(stops) else {})})
        log(f"  {c.label:<40} {crit.name}={percent(score)}  acc={percent(mean)}  ({secs:.1f}s)")
        beats_head = head_score is None or score >= head_score + need
        if beats_head and (best is None or best[0] == "head" or (score, mean) > (best_score, best_mean)):
            best_score, best_mean, best = score, mean, ("model", c)
    _say_cut_short(ctx, cut_runs, None if best[0] == "head" else best[1].label)
    if best[0] == "head":
        return Choice(head[0], head[1], rows, _describe(crit, fold_desc, len(y)), notes)
    c = best[1]
    if id(c) in fitted:                     # the cross-fitted members' average is the model: no further training
        final = fitted[id(c)]
        log(f"  {c.label}: chosen; its cross-fitted members' average is the model")
        rows.append({"candidate": c.label, "kind": "model", "role": "final fit",
                     "final": "the cross-fitted members' average, settled (every fit-part row seen by a member; "
                              "no further training)", "fit_seconds": 0.0, "steps": 0})
        return Choice(c, final, rows, _describe(crit, fold_desc, len(y)), notes)
    log(f"  {c.label}: chosen; training on the whole fit part ({fit_idx.numel()} samples)")
    final = ctx.fit(c, fit_idx)
    rows.append({"candidate": c.label, "kind": "model", "role": "final fit", "fit_seconds": round(final.seconds, 4),
                 "steps": final.steps, **_stop_info(final)})
    return Choice(c, final, rows, _describe(crit, fold_desc, len(y)), notes)


def _cross_fits(cand, parts) -> bool:
    """Whether model repair ``cand`` cross-fits over as many folds as there are ``parts`` (mixft's
    ``cross_fit: k`` with k the recipe's folds): then one cross-fitted run on those folds gives both its
    out-of-fold predictions and its model (:func:`_cross_fitted`)."""
    cfg = cand.config()
    k = getattr(cfg, "cross_fit", 1)
    return isinstance(k, int) and k > 1 and k == len(parts) and getattr(cfg, "settle", None) != "off"


def _say_cut_short(ctx: "FitContext", loops: dict, chosen: Optional[str]) -> None:
    """A warning for each model repair compared (with the heads, or the other candidates) and NOT chosen,
    skipped ones included, whose training a time cap cut short of its learning-rate schedule
    (:func:`repair.modelrepair.finetune.schedule_cut_short`): the budget, not the repair, may be what
    lost it the comparison (the chosen one is warned of where the output is written)."""
    from .modelrepair.finetune import schedule_cut_short

    for label, loop in loops.items():
        cut = schedule_cut_short(loop) if label != chosen and isinstance(loop, dict) else None
        if cut:
            ctx.warnings.append(f"{label} (a model repair compared and not chosen): {cut}")
            ctx.log(f"warning: {ctx.warnings[-1]}")


def _cross_fitted(cand, ctx, fit_idx, parts, y, log, stop_check=None):
    """One cross-fitted run of ``cand`` on the fit part with the recipe's folds ``parts`` as its
    folds: member ``j`` trains on every fold but ``j``; each row is predicted by the member that did
    not train on it, at the point its settling chose (``Fitted.oof_pred``), and the members' average is
    the model. Returns the Fitted, a BadInput the fit raised (a fold too small for it), or None when
    the run gave no out-of-fold predictions (settling off): the caller then trains fold by fold.

    What the out-of-fold predictions have seen: member ``j`` keeps its best evaluation on fold ``j``
    and settling chooses its point on the predictions of every fold (a few candidates), as each head
    method's inner selection (a penalty, a threshold) is made on the whole fit part before its folds
    are refitted; the model repair still needs the same edge over the head (:func:`required_gain`).
    ``stop_check``: the bound after each member but the last (``ModelRepairInputs.stop_check``); a run
    it ends is returned as the :class:`repair.methods.CannotWin`."""
    folds = []
    for held in parts:
        train = torch.ones(y.numel(), dtype=torch.bool)
        train[held] = False
        folds.append((train.nonzero().flatten(), held))
    log(f"  {cand.label}: cross-fitted on the same {len(parts)} folds ({fit_idx.numel()} samples)")
    try:
        f = ctx.fit(cand, fit_idx, folds=folds, stop_check=stop_check)
    except (BadInput, CannotWin) as e:
        return e
    if f.oof_pred is None or bool((f.oof_pred < 0).any()):
        log(f"  {cand.label}: no out-of-fold predictions (settling off); trained fold by fold instead")
        return None
    return f


def _describe(crit: Criterion, scheme: str, n: int) -> dict:
    return {"criterion": crit.name, "scheme": scheme, "n_fit": int(n), "n_heldout": int(n)}


__all__ = ["Choice", "Chosen", "FitContext", "Fitted", "choose", "choose_heads", "ensemble", "selection_basis"]
