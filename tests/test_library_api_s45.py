"""The library as a notebook calls it (library-API audit, session 45): registering a method before the
built-ins load, any name as a method's name, a config given as the method's own dataclass, numpy
values as settings, arrays of the wrong kind, and the solver's own arguments."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_library_inputs import arrays

from repair.config import ConfigError
from repair.methods import BadArrays, RepairInputs, RepairOutput, get_method, register_method
from repair.solver import fit_logreg


def _arrays():
    return arrays(n=80)         # the library-inputs tests' arrays: a class and a spurious feature


def test_a_built_in_name_registered_first_thing_is_refused_and_the_registry_stays_whole():
    """In a fresh process (a notebook's first cell) a method registered as 'dfr' was accepted; the first
    lookup then raised 'registered twice' and left only three methods for the rest of the process."""
    prog = """
import dataclasses
from repair.methods import RepairOutput, get_method, list_methods, register_method
@dataclasses.dataclass
class Cfg:
    pass
try:
    register_method("dfr", summary="mine", config=Cfg)(lambda i, c: RepairOutput(i.W, i.b, {}))
    print("accepted")
except ValueError as e:
    print("refused:", e)
print(get_method("dfr").fn.__module__, len(list_methods()) >= 9, get_method("afr").name)
"""
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True).stdout
    assert out.startswith("refused: repair method 'dfr' is already registered (by repair.methods.dfr)"), out
    assert out.splitlines()[-1] == "repair.methods.dfr True afr", out


@pytest.mark.parametrize("name", [None, 3, "", "a b", "x\ny", "auto", "auto-ft", "mine.yaml", "a/b"])
def test_a_method_name_that_no_recipe_could_reach_is_refused(name):
    @dataclasses.dataclass
    class Cfg:
        pass

    from repair.methods import list_methods

    with pytest.raises(ValueError, match="repair method|name"):
        register_method(name, summary="s", config=Cfg)(lambda i, c: RepairOutput(i.W.clone(), i.b.clone(), {}))
    assert sorted(m.name for m in list_methods())            # still listable (an int name broke the sort)


@pytest.mark.parametrize("method,field,value", [
    ("afr", "gamma_grid", (-5.0,)), ("afr", "max_iter", 0), ("afr", "tol", -1.0), ("afr", "gamma_grid", ()),
    ("afr", "l2", float("inf")), ("neurontune", "aggregation", "any"), ("neurontune", "threshold_quantiles", (2.0,)),
    ("dfr", "n_refits", 0), ("dfr", "protocol", "PAPER"), ("mix", "n_refits", -1), ("nsf", "l2", float("nan"))])
def test_a_config_given_as_its_dataclass_is_checked_as_a_dict_is(method, field, value):
    m = get_method(method)
    X, y, W, b, g = (torch.from_numpy(np.ascontiguousarray(a)) for a in _arrays())
    inputs = RepairInputs(X=X, y=y, W=W, b=b, groups=g if m.uses_groups else None, seed=0)
    with pytest.raises(ConfigError, match=field):
        m.make_config({field: list(value) if isinstance(value, tuple) else value})
    bad = dataclasses.replace(m.default_config(), **{field: value})
    with pytest.raises(ConfigError, match=field):
        m(inputs, bad)


def test_numpy_values_are_settings_as_python_values_are():
    m = get_method("afr")
    cfg = m.make_config({"l2": np.float32(0.5), "max_iter": np.int64(100), "refit_on_all": np.False_,
                         "gamma_grid": np.array([0.0, 2.0])})
    assert cfg.l2 == pytest.approx(0.5) and type(cfg.l2) is float and cfg.max_iter == 100
    assert cfg.refit_on_all is False and cfg.gamma_grid == (0.0, 2.0)
    assert get_method("dfr").make_config({"c_grid": np.array([0.1, 1.0])}).c_grid == (0.1, 1.0)


class _FakeSparse:
    """What a scipy sparse matrix offers (scipy is not a dependency)."""

    def toarray(self):
        raise AssertionError("never densified by the library")


def test_arrays_of_the_wrong_kind_are_bad_arrays_naming_them():
    from repair.choosing import choose_heads

    X, y, W, b, g = _arrays()
    Xt = torch.from_numpy(X)
    with pytest.raises(BadArrays, match="X must be a dense tensor holding its values, got a meta tensor"):
        get_method("dfr")(RepairInputs(X=Xt.to("meta"), y=torch.from_numpy(y), W=torch.from_numpy(W),
                                       b=torch.from_numpy(b), seed=0))
    with pytest.raises(BadArrays, match="sparse"):
        choose_heads("auto", Xt.to_sparse(), y, W, b)
    with pytest.raises(BadArrays, match=r"pass .toarray\(\)"):
        choose_heads("auto", _FakeSparse(), y, W, b)
    with pytest.raises(BadArrays, match="only one class"):            # a ValueError, as a method call raises
        choose_heads("auto", X, np.zeros_like(y), W, b)


def test_a_dataframe_series_or_index_is_read_by_its_values():
    """torch iterated a DataFrame by its column names (KeyError deep inside); a Series or an Index
    worked and still does (review). pandas is not a dependency: skipped without it."""
    from repair.choosing import choose_heads

    pd = pytest.importorskip("pandas")
    X, y, W, b, g = _arrays()
    ref = choose_heads("dfr", X, y, W, b)
    got = choose_heads("dfr", pd.DataFrame(X), pd.Series(y, index=np.arange(len(y))[::-1]), W, pd.Series(b))
    assert torch.equal(got.final.W, ref.final.W) and torch.equal(got.final.b, ref.final.b)


@pytest.mark.parametrize("kw,match", [
    ({"l1": float("nan")}, "l1 must be finite"), ({"l2": float("nan")}, "l2 must be finite"),
    ({"l2": float("inf")}, "l2 must be finite"), ({"ref_pull": -1.0}, "ref_pull must be finite and non-negative"),
    ({"l2": 1.0, "sample_weight": torch.full((80,), float("nan"))}, "sample_weight must be finite"),
    ({"l2": 1.0, "sample_weight": torch.full((80,), float("inf"))}, "sample_weight must be finite"),
    ({"l2": 1.0, "init_W": torch.zeros(8, 2)}, r"init_W must be \(2, 8\)"),
    ({"l2": 1.0, "device": "bogus"}, "device 'bogus' is not a torch device"),
    ({"l2": 1.0, "num_threads": 0}, "num_threads must be"), ({"l2": 1.0, "max_iter": 0}, "max_iter"),
    ({"l2": 1.0, "tol": float("nan")}, "tol must be")])
def test_the_solvers_arguments_are_checked(kw, match):
    X, y, W, b, g = _arrays()
    with pytest.raises(ValueError, match=match):
        fit_logreg(torch.from_numpy(X), torch.from_numpy(y), 2, **kw)


def test_fractional_labels_are_refused_not_truncated():
    X, y, W, b, g = _arrays()
    with pytest.raises(ValueError, match="whole class indices"):
        fit_logreg(torch.from_numpy(X), torch.from_numpy(y).float() + 0.5, 2, l2=1.0)
    Wf, _, _ = fit_logreg(torch.from_numpy(X), torch.from_numpy(y).float(), 2, l2=1.0)      # whole floats: fine
    assert torch.isfinite(Wf).all()


def test_set_head_refuses_what_it_would_write_wrong_for_every_family(tmp_path):
    """A transposed head was an internal error (exit 3), a NaN head was written, an integer head
    truncated the weights; the ONNX family took numpy (one rule now, repair.adapters.base.new_head)."""
    import repair
    from conftest import make_deployed_onnx, make_timm_folder

    from repair.adapters import LoadOptions
    from repair.errors import BadInput

    src, _ = make_deployed_onnx(tmp_path / "m.onnx")
    for m in (repair.load_model(make_timm_folder(tmp_path / "timm")),
              repair.load_model(src, LoadOptions(image_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                                                 class_names=["cat", "dog", "fox"]))):
        W, b = m.head_params()
        for bad, match in (((W.T, b), "has shape"), ((W.long().numpy(), b), "W must be a float tensor"),
                           ((W, None), "b must be a float tensor"), ((W * float("nan"), b), "NaN"),
                           ((W.long(), b), "W must be a float tensor, got torch.int64")):
            with pytest.raises(BadInput, match=match):
                m.set_head(*bad)
            assert torch.equal(m.head_params()[0], W)              # nothing written
        m.set_head(W.double().requires_grad_() * 0.5, b)
        assert torch.allclose(m.head_params()[0], W * 0.5)
        m.set_head(W.numpy() * 0.25, b.numpy())                   # numpy floats: taken as tensors
        assert torch.allclose(m.head_params()[0], W * 0.25)


def test_a_fix_result_and_a_model_show_in_one_line(tmp_path):
    import repair
    from conftest import make_images, make_timm_folder

    m = make_timm_folder(tmp_path / "m")
    r = repair.fix(m, make_images(tmp_path / "d", n_per_class=10), out=tmp_path / "o")
    text = repr(r)
    assert text.startswith("FixResult(") and "\n" not in text and len(text) < 400, text
    assert str(tmp_path / "o") in text and r["candidate"] in text and "accuracy=" in text
    assert repr(repair.load_model(m)) == f"<TorchImageAdapter timm {str(m)!r}, 3 classes>"


def test_a_config_given_whole_is_checked_not_rebuilt_and_its_defaults_are_its_authors():
    """A plugin's config whose default the per-setting rules would refuse (a line break in a text)
    runs as it did; a list stays a list and __post_init__ does not run again (review)."""
    from repair.config import check_config

    @dataclasses.dataclass
    class Cfg:
        note: str = "first line\nsecond line"
        grid: list = dataclasses.field(default_factory=lambda: [1.0, 2.0])
        runs: int = 0

        def __post_init__(self):
            self.runs += 1

    c = Cfg(grid=[1.0, 3.0])
    out = check_config(c)
    assert out is c and out.grid == [1.0, 3.0] and out.runs == 1
    with pytest.raises(ConfigError, match="grid"):
        check_config(Cfg(grid=[1.0, float("nan")]))


def test_the_solver_takes_numbers_in_the_forms_it_always_took():
    X, y, W, b, g = _arrays()
    for kw in ({"tol": torch.tensor(1e-4)}, {"max_iter": 100.0}, {"num_threads": np.int64(1)},
               {"tol": np.float32(1e-4)}, {"l2": torch.tensor([0.1, 1.0])}):
        Wk, bk, info = fit_logreg(torch.from_numpy(X), torch.from_numpy(y), 2, **{"l2": 1.0, **kw})
        assert torch.isfinite(Wk).all(), kw
