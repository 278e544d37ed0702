"""Shared, batched last-layer solver: multinomial logistic regression in torch.

One call fits ``K`` independent problems at once (several regularisation strengths,
several subsamples / seeds, several feature masks ...) on the same embeddings, on
CPU or CUDA. Every repair method refits its head through :func:`fit_logreg`.

Objective (per problem ``k``; the *sklearn* convention)
-------------------------------------------------------
::

    F_k(W, b) =   sum_i w_ki * CE(softmax(W x~_ki + b), y_i)
                + l1_k * ||W||_1
                + l2_k / 2 * ||W||_F^2
                + ref_pull_k / 2 * (||W - W_ref||_F^2 + ||b - b_ref||^2)

* The cross-entropy is a **sum** (not a mean) of weighted per-sample losses, so
  ``l1 = 1/C`` is exactly sklearn's ``LogisticRegression(penalty="l1", C=C)``
  (``C * sum_i CE_i + ||w||_1``) and ``l2 = 1/C`` is sklearn's
  ``penalty="l2"`` (``C * sum_i CE_i + 1/2 ||w||^2``). The DFR grid
  ``C in [1, .7, .3, .1, .07, .03, .01]`` therefore means the same thing here
  when the sample weights are 0/1 subsample indicators.
* The model is multinomial (softmax), binary is just ``C = 2``. For two classes and
  an **L1** penalty this is exactly sklearn's binary objective (the optimal split
  of the logit difference ``v`` over the two rows costs ``||v||_1``). For two
  classes and an **L2** penalty it equals the binary problem with ``C_binary = 2 C``.
* The intercept ``b`` is never penalised by ``l1``/``l2`` (like sklearn's saga/lbfgs
  solvers; liblinear penalises it slightly, which makes almost no difference).
* ``x~`` are the *internal* features: the raw ``X`` standardised with per-feature
  mean / std (``standardize=True``, statistics computed once over all rows of
  ``X``, whatever their weights), then optionally mapped per problem by
  ``x~ = z * feature_scale_k + feature_shift_k`` (a feature mask is
  ``feature_scale = 0/1``). Penalties and the pull act on these internal
  coordinates. ``init_*`` and ``ref_*`` are given in *raw* coordinates (same space
  as the returned head) and mapped in. All transforms are folded back on return:
  ``X @ W[k].T + b[k]`` on the *raw* ``X`` is model ``k``.

Algorithm
---------
FISTA (accelerated proximal gradient) with soft-thresholding for L1, a per-problem
backtracking line search that also lets the step grow (the local curvature of the
logistic loss near the optimum is far below the global Lipschitz bound), and
gradient-based adaptive restart (O'Donoghue & Candes). The first step is ``1/L``
with ``L`` from a few power iterations on the weighted Gram matrix. The logits are
linear in the parameters, so those at the extrapolated point are combined from the
last two iterates: an iteration costs 2 data passes (forward at the new iterate,
backward at the extrapolated point) plus a forward pass per backtracking step of
the problems that need one. Internally the loss is divided by ``S_k = sum_i w_ki``
(same minimiser; keeps float32 numbers O(1)). A problem stops when the
gradient-mapping norm ``max |x+ - y| / step`` (i.e. the proximal gradient of the
*mean* loss in internal units; the KKT violation for L1) is ``<= tol`` (scaled by
``max(1, (l2+ref_pull)/S_k)`` so strongly penalised problems are not asked for more
than float32 gives). Converged problems are frozen and compacted out of the batch,
so easy problems do not pay for hard ones.

Data layouts (chosen automatically; ``gather``/``working_set`` force them):

* shared: one ``(N, D)`` matrix, all ``K*C`` outputs in one GEMM per pass (best when
  problems use most rows: the data is read once for all problems);
* gathered: when each problem uses a small fraction of the rows (0 weights, e.g.
  DFR's group-balanced subsamples), each problem's rows are gathered into a
  feature-major ``(K, D, M)`` tensor and batched GEMMs are used;
* working sets (L1 problems, gathered rows): FISTA runs on per-problem working sets
  of features grown from the KKT violations of the full gradient until none is
  left (celer-style inexact inner solves, problems bucketed by working-set size);
  features outside the working set stay exactly 0.

On CPU, small problems run single-threaded (``num_threads="auto"``): thread
synchronisation costs more than it saves there, dramatically so on a busy machine.

Public API
----------
``fit_logreg(X, y, num_classes, *, sample_weight=None, l1=0., l2=0., ref_pull=0.,
init_W=None, init_b=None, ref_W=None, ref_b=None, feature_scale=None,
feature_shift=None, standardize=True, max_iter=2000, tol=1e-4, device="cpu",
dtype=torch.float32, gather="auto", working_set="auto", num_threads="auto")
-> (W (K,C,D), b (K,C), info)``

    ``sample_weight``: None, (N,) or (K,N), non-negative (0/1 = subsampling).
    ``l1``, ``l2``, ``ref_pull``: float or sequence/tensor of length ``K``.
    ``init_W``/``ref_W``: ``(C,D)`` or ``(K,C,D)``; ``init_b``/``ref_b``: ``(C,)`` or
    ``(K,C)`` (raw coordinates; warm start / pull target). ``feature_scale`` /
    ``feature_shift``: ``(D,)`` or ``(K,D)``. ``K`` is the common leading size of all
    per-problem arguments (1 if none). Returns tensors of ``dtype`` (float32 default)
    on ``device``; ``info`` has ``n_iter`` (K,), ``converged`` (K,), ``objective`` (K,)
    (the value of ``F_k``, sklearn scale, internal coordinates), ``seconds``,
    ``gathered``, ``working_set``, ``n_outer``, ``K``.

``fit_binary_l2_path(Z (K,n,d), t (K,n), w (K,n), l2 (L,), *, tol=1e-4, max_iter=50,
form="auto", factor_dtype=torch.float32, num_threads="auto") -> (v (K,L,d), c (K,L), info)``

    Small dense *L2* problems (DFR's fast protocol): ``K`` binary logistic regressions
    (sklearn's binary ``C = 1/l2`` convention, intercept free) solved along a
    warm-started penalty path by damped Newton with a lazily refreshed Hessian, in the
    primal ``(d+1)``-dimensional form or, when ``n`` is small next to ``d``, in the
    ``n``-dimensional Gram-matrix (kernel) form; see its docstring. No standardisation
    or folding: the caller passes the features it wants.

``fit_binary_l2_path_lbfgs(X (n,d), blocks [(start, stop)], t (n,T), w (n,)|(n,T), l2 (L,)|(L,B)|(L,B,T), *,
scale=None, shift=None, offset=None, tol=1e-3, max_iter=500) -> (v (B,T,L,d), c (B,T,L), info)``

    The same binary L2 problems for LARGE data: batched L-BFGS on the rows as given (no
    per-problem copy; every block of rows holds ``T`` tasks sharing each pass; the
    standardisation ``x * scale + shift`` folded into the parameters; the line search runs on
    the logits, free; ``offset`` (n,T) fixed logit offsets centre a penalty elsewhere than 0).
    ``path_solver(n, d, problems, data_bytes, blocks=)`` picks Newton or L-BFGS (estimated
    cost, Newton's copies against a memory budget); ``fit_logreg``'s two-class smooth path uses
    it too, and solves problems that share every row and the feature map (AFR's grid, pulled
    to the original head) as one L-BFGS block.

``fit_logreg(..., row_mix=RowMix(i, p, s, w))`` (:mod:`.mixing`): every problem also has mixed
rows ``(1 - s) x_i + s x_p`` (label of ``x_i``) that are never formed: the two-class smooth paths
(Newton, L-BFGS) work from the rows themselves (a mixed row's logit is the mix of two logits), at the
cost of the rows alone; other solvers get them formed.

Layout: :mod:`.fista` (``fit_logreg``), :mod:`.lbfgs` (``fit_binary_l2_path_lbfgs``,
``path_solver``), :mod:`.newton` (``fit_binary_l2_path``,
``newton_cost``), :mod:`.mixing` (``RowMix``), :mod:`.weights` (``fold_affine``, ``standardization``,
``class_balanced_weights``, ``group_balanced_weights``, ``balanced_subsample_weights``,
``expected_balanced_weights``). Splitting, scoring and choosing among candidates live
in :mod:`repair.selection`; the CPU thread policy in :mod:`repair.threads`.
"""
from .fista import fit_logreg
from .lbfgs import fit_binary_l2_path_lbfgs, lbfgs_cost, path_solver
from .newton import fit_binary_l2_path, newton_cost
from .weights import (balanced_subsample_weights, class_balanced_weights, constant_features,
                      expected_balanced_weights, feature_moments, fold_affine, group_balanced_weights,
                      standardization)

__all__ = ["fit_logreg", "fit_binary_l2_path", "fit_binary_l2_path_lbfgs", "path_solver", "lbfgs_cost",
           "newton_cost", "fold_affine", "standardization", "feature_moments",
           "class_balanced_weights", "group_balanced_weights", "balanced_subsample_weights",
           "expected_balanced_weights", "constant_features"]
