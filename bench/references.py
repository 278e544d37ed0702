"""Reference last-layer repairs, run on the same embeddings as ``repair``'s methods.

All functions take numpy arrays of the *validation* (repair) split only — ``X`` (N, D) embeddings,
``y`` (N,) class indices, ``g`` (N,) group ids — and return a :class:`RefResult` whose head
``(W (C, D), b (C,))`` acts on the *raw* embeddings (``X @ W.T + b``; any standardisation is folded
in), so every method is scored by the same code on the test split.

``dfr_reference``
    The DFR paper's validation protocol (Kirichenko et al. 2023; official code
    ``dfr_evaluate_spurious.py``: ``dfr_on_validation_tune`` + ``dfr_on_validation_eval``, default
    flags ``balance_dfr_val`` on, ``notrain_dfr_val`` on), re-written here:

    1. *tune*: shuffle the validation set, split it in half; fit a ``StandardScaler`` on a
       group-balanced subsample (every group cut to the smallest group's size) of one half; for
       every ``C`` in ``[1, .7, .3, .1, .07, .03, .01]`` fit
       ``LogisticRegression(penalty='l1', C=C, solver='liblinear')`` on that subsample and score
       worst-group accuracy on the other half; keep the best ``C`` (first in grid order on ties).
    2. *eval*: fit a ``StandardScaler`` on the whole validation set; 20 times, draw a fresh
       group-balanced subsample of the whole validation set and fit the same model with the chosen
       ``C``; average the coefficients and intercepts.

    With scikit-learn >= 1.8 ``penalty='l1'`` is spelled ``l1_ratio=1`` (same objective; the old
    spelling warns). liblinear is binary-only there: more than two classes are fitted one-vs-rest
    (``OneVsRestClassifier``), which is what liblinear did internally in older versions.

``spuco_reference("DFR" | "DISPEL", ...)``
    SpuCo's own implementations (``spuco.last_layer_retrain.DFR`` / ``DISPEL``, PyPI ``spuco``) run
    unchanged on the embeddings: the model is ``SpuCoModel(nn.Identity(), D, C)`` and the data a
    ``GroupLabeledDatasetWrapper`` over a ``TensorDataset(X, y)``. The one override is
    ``encode_dataset``: SpuCo's version pushes the data through the backbone with a 4-worker
    ``DataLoader``; with an identity backbone it returns the same tensors, so the override returns
    them directly (no worker processes on a 2-core machine). A second, compatibility-only shim: SpuCo
    calls ``random.sample`` on a ``set``, which Python >= 3.11 refuses; while SpuCo runs, its module
    ``random`` is replaced by one whose ``sample`` sorts a set first (Python < 3.11 drew from the
    set's iteration order, which for small ints is the sorted order). ``data_for_scaler`` is the validation
    set (SpuCo standardises only when it is given; DFR's protocol standardises). SpuCo's DFR selects
    ``C`` on a random half of the validation set (``labeled_valset_size=0.5``, one fit per ``C`` on
    a group-balanced subsample of the other half) and then averages 20 group-balanced refits on the
    whole set, as DFR does; DISPEL additionally searches its mixing weight ``s`` in
    ``[1, .9, .8, .7]`` (``alpha=1``). SpuCo uses sklearn's liblinear directly, so under
    scikit-learn >= 1.8 it handles two classes only (every benchmark task is binary).
"""
from __future__ import annotations

import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

DFR_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


@dataclass
class RefResult:
    name: str
    W: np.ndarray                 # (C, D) head on raw embeddings
    b: np.ndarray                 # (C,)
    seconds: float
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------ helpers
def _l1_logreg(C: float, random_state: Optional[int] = None):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=random_state)
    return LogisticRegression(penalty="l1", C=C, solver="liblinear", random_state=random_state)


def fit_l1(X: np.ndarray, y: np.ndarray, C: float, num_classes: int,
           random_state: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """sklearn liblinear L1 logistic regression; (coef (1 or C, D), intercept) as sklearn gives them.
    ``random_state`` seeds liblinear's coordinate order (sklearn's default draws it from numpy's
    global RNG, which would make results depend on whatever ran before)."""
    if num_classes <= 2:
        m = _l1_logreg(C, random_state).fit(X, y)
        return m.coef_.copy(), m.intercept_.copy()
    from sklearn.multiclass import OneVsRestClassifier

    m = OneVsRestClassifier(_l1_logreg(C, random_state)).fit(X, y)
    coef = np.stack([e.coef_[0] for e in m.estimators_])
    icpt = np.array([e.intercept_[0] for e in m.estimators_])
    return coef, icpt


def to_head(coef: np.ndarray, intercept: np.ndarray, num_classes: int, scaler=None) -> tuple[np.ndarray, np.ndarray]:
    """sklearn coefficients (on standardised inputs when ``scaler`` is given) -> a (C, D) head
    on raw inputs whose argmax equals sklearn's ``predict``. Binary: logits ``[0, z]``."""
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64).reshape(-1)
    if scaler is not None:
        scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
        w = coef / scale[None, :]
        c = intercept - (coef * (scaler.mean_ / scale)[None, :]).sum(1)
    else:
        w, c = coef, intercept
    if num_classes == 2 and w.shape[0] == 1:
        W = np.vstack([np.zeros_like(w), w])
        b = np.array([0.0, c[0]])
    else:
        W, b = w, c
    return W.astype(np.float32), b.astype(np.float32)


def head_predict(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (X @ W.T + b).argmax(1)


def worst_group_acc(pred: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    return float(min((pred[g == k] == y[g == k]).mean() for k in np.unique(g)))


def group_balanced_subsample(g: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Indices: every group present cut (at random) to the smallest group's size."""
    parts = [np.flatnonzero(g == k) for k in np.unique(g)]
    m = min(len(p) for p in parts)
    return np.concatenate([rng.permutation(p)[:m] for p in parts])


# ------------------------------------------------------------------ DFR protocol (own rewrite)
def dfr_reference(X: np.ndarray, y: np.ndarray, g: np.ndarray, *, num_classes: int, seed: int = 0,
                  c_grid: Sequence[float] = DFR_C_GRID, n_refits: int = 20) -> RefResult:
    """DFR on the validation set (tune C on half, 20 group-balanced refits on all); see module doc."""
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    g = np.asarray(g)
    rng = np.random.RandomState(seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # -- tune
        idx = rng.permutation(len(X))
        n_half = len(X) // 2
        held, fit = idx[:n_half], idx[n_half:]
        sub = fit[group_balanced_subsample(g[fit], rng)]
        scaler = StandardScaler().fit(X[sub])
        Xs, Xh = scaler.transform(X[sub]), scaler.transform(X[held])
        scores = {}
        for C in c_grid:
            coef, icpt = fit_l1(Xs, y[sub], C, num_classes, random_state=int(rng.randint(2**31 - 1)))
            W, b = to_head(coef, icpt, num_classes)
            scores[C] = worst_group_acc(head_predict(Xh, W, b), y[held], g[held])
        best_C = max(c_grid, key=lambda c: (scores[c], -list(c_grid).index(c)))
        t_tune = time.perf_counter() - t0
        # -- eval: averaged group-balanced refits on the whole validation set
        scaler = StandardScaler().fit(X)
        Xall = scaler.transform(X)
        coefs, icpts = [], []
        for _ in range(n_refits):
            sub = group_balanced_subsample(g, rng)
            coef, icpt = fit_l1(Xall[sub], y[sub], best_C, num_classes, random_state=int(rng.randint(2**31 - 1)))
            coefs.append(coef)
            icpts.append(icpt)
        W, b = to_head(np.mean(coefs, 0), np.mean(icpts, 0), num_classes, scaler)
    secs = time.perf_counter() - t0
    return RefResult("ref_dfr", W, b, secs,
                     {"best_C": best_C, "tune_wga": {str(k): v for k, v in scores.items()},
                      "tune_seconds": t_tune, "refit_seconds": secs - t_tune, "n_refits": n_refits,
                      "nonzero_features": int((np.abs(W).sum(0) > 0).sum())})


# ------------------------------------------------------------------ plain pseudo-group DFR (no labels)
def pseudo_dfr_reference(X: np.ndarray, y: np.ndarray, logits0: np.ndarray, *, num_classes: int, seed: int = 0,
                         c_grid: Sequence[float] = DFR_C_GRID, n_refits: int = 20) -> RefResult:
    """The simplest label-free DFR (the issue's "plain pseudo-group DFR"): groups = class x
    (original model correct on the sample); group-balanced subsamples; sklearn L2 logistic
    regression on standardised features; C chosen by the worst pseudo-group accuracy on a
    held-out half; ``n_refits`` group-balanced refits on everything, averaged."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    g = 2 * y + (np.asarray(logits0).argmax(1) != y)
    rng = np.random.RandomState(seed)
    t0 = time.perf_counter()

    def fit(Xf, yf, C):
        m = LogisticRegression(C=C, max_iter=1000, random_state=int(rng.randint(2**31 - 1))).fit(Xf, yf)
        return m.coef_.copy(), m.intercept_.copy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idx = rng.permutation(len(X))
        held, rest = idx[:len(X) // 2], idx[len(X) // 2:]
        sub = rest[group_balanced_subsample(g[rest], rng)]
        scaler = StandardScaler().fit(X[sub])
        Xs, Xh = scaler.transform(X[sub]), scaler.transform(X[held])
        scores = {}
        for C in c_grid:
            W, b = to_head(*fit(Xs, y[sub], C), num_classes)
            scores[C] = worst_group_acc(head_predict(Xh, W, b), y[held], g[held])
        best_C = max(c_grid, key=lambda c: (scores[c], -list(c_grid).index(c)))
        scaler = StandardScaler().fit(X)
        Xall = scaler.transform(X)
        coefs, icpts = [], []
        for _ in range(n_refits):
            sub = group_balanced_subsample(g, rng)
            coef, icpt = fit(Xall[sub], y[sub], best_C)
            coefs.append(coef)
            icpts.append(icpt)
        W, b = to_head(np.mean(coefs, 0), np.mean(icpts, 0), num_classes, scaler)
    return RefResult("ref_pseudo_dfr", W, b, time.perf_counter() - t0,
                     {"best_C": best_C, "tune_worst_pseudo_group": {str(k): v for k, v in scores.items()},
                      "pseudo_group_counts": np.bincount(g, minlength=2 * num_classes).tolist()})


# ------------------------------------------------------------------ SpuCo
class _SetSampleRandom:
    """SpuCo calls ``random.sample(a_set, k)``, which Python 3.11 rejects ("Population must be a
    sequence"). This stand-in for SpuCo's module-level ``random`` sorts a set first (what
    ``sorted(d)`` in the error message asks for) and delegates everything else to ``random``."""

    def __getattr__(self, name):
        return getattr(random, name)

    @staticmethod
    def sample(population, k, **kw):
        if isinstance(population, (set, frozenset)):
            population = sorted(population)
        return random.sample(population, k, **kw)


@contextmanager
def _spuco_py311_compat():
    import spuco.last_layer_retrain.dfr as m_dfr
    import spuco.last_layer_retrain.dispel as m_dispel

    saved = m_dfr.random, m_dispel.random
    m_dfr.random = m_dispel.random = _SetSampleRandom()
    try:
        yield
    finally:
        m_dfr.random, m_dispel.random = saved


@contextmanager
def _preserve_global_rng():
    import torch

    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)


def spuco_available() -> Optional[str]:
    """None when SpuCo imports, else why not."""
    try:
        import spuco.last_layer_retrain  # noqa: F401
    except Exception as e:  # ImportError, or a broken optional dependency
        return f"{type(e).__name__}: {e}"
    return None


def spuco_reference(kind: str, X: np.ndarray, y: np.ndarray, g: np.ndarray, *, num_classes: int,
                    seed: int = 0, verbose: bool = False) -> RefResult:
    import torch
    from torch.utils.data import TensorDataset

    from spuco.datasets import GroupLabeledDatasetWrapper
    from spuco.last_layer_retrain import DFR, DISPEL
    from spuco.models import SpuCoModel
    from spuco.utils.random_seed import set_seed

    if kind not in ("DFR", "DISPEL"):
        raise ValueError(kind)
    base = DFR if kind == "DFR" else DISPEL

    class _OnEmbeddings(base):  # type: ignore[misc, valid-type]
        def encode_dataset(self, dataset):  # identity backbone: the stored tensors themselves
            items = [dataset[i] for i in range(len(dataset))]
            X_ = torch.stack([it[0] for it in items])
            y_ = torch.stack([torch.as_tensor(it[1]) for it in items])
            if type(dataset) == GroupLabeledDatasetWrapper:  # noqa: E721 (SpuCo's own test)
                return X_, y_, torch.tensor([int(it[2]) for it in items])
            return X_, y_

    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    g = np.asarray(g)
    base_ds = TensorDataset(Xt, yt)
    partition = {(int(k), 0): np.flatnonzero(g == k).tolist() for k in np.unique(g)}
    labeled = GroupLabeledDatasetWrapper(base_ds, partition)
    with _preserve_global_rng(), _spuco_py311_compat(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_seed(seed)
        t0 = time.perf_counter()
        model = SpuCoModel(torch.nn.Identity(), Xt.shape[1], num_classes)
        algo = _OnEmbeddings(group_labeled_set=labeled, model=model, data_for_scaler=base_ds,
                             device=torch.device("cpu"), verbose=verbose)
        algo.train()
        secs = time.perf_counter() - t0
    C, coef, icpt, scaler = algo.linear_model
    W, b = to_head(coef, icpt, num_classes, scaler)
    info = {"best_C": C}
    if kind == "DISPEL":
        info.update({"best_s": algo.best_s, "best_alpha": algo.best_alpha})
    return RefResult(f"spuco_{kind.lower()}", W, b, secs, info)
