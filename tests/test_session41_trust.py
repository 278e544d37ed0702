"""Trust fixes of the forty-first session, each with the case that failed before it."""
from __future__ import annotations

import pytest

from conftest import make_zoo_parts, run_cli
from test_zoo_manifest_checks import copy_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two tiny timm models, a small image repair set and a held-out set (``m0``, ``m1``, ``val``, ``test``)."""
    return make_zoo_parts(tmp_path_factory.mktemp("zoo-s41"), with_test=True)


# ------------------------------------------------------------------ a zoo CSV row cut off before its gate
def test_a_csv_manifest_row_with_fewer_cells_than_the_header_is_exit_2_naming_the_line(tmp_path, parts):
    """A CSV manifest row with fewer cells than the header read the missing ones as empty: a row cut off
    before its `gate` cell (an editor, a script trimming trailing fields) ran ungated, exit 0 below the
    threshold every other row is held to. It is refused before any work, naming the line and the cell;
    a row that writes the empty cell (`a,m0,val,place,`) still means "no gate"."""
    copy_parts(tmp_path, parts)
    path = tmp_path / "z.csv"
    path.write_text("name,checkpoint,data,group_by,gate\na,m0,val,place,1%\nb,m1,val,place\n")
    code, out, err = run_cli("zoo", path, "--mode", "eval", "-q")
    assert code == 2, err[:2000]
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err
    assert "line 3 has fewer fields than the header (4 of 5; no 'gate' cell)" in err, err
    assert not list(tmp_path.glob("*-zoo")) and not any((tmp_path / "outs").iterdir())
    from repair.zoo import load_manifest

    path.write_text("name,checkpoint,data,group_by,gate\na,m0,val,place,1%\nb,m1,val,place,\n")
    a, b = load_manifest(path, "eval").entries
    assert (a.gate, b.gate) == ("1%", None)


def test_a_data_table_short_row_still_reads_missing_cells_as_empty(tmp_path):
    """Data tables keep reading a short row's missing cells as empty (refused where they matter: a label,
    a group); only the zoo's manifest, where an empty cell is a setting, refuses the row itself."""
    from repair.data import read_csv_text
    from repair.errors import BadInput

    cols, rows = read_csv_text("path,label,note\na.png,cat\n", tmp_path / "t.csv")
    assert cols == ["path", "label", "note"] and rows == [{"path": "a.png", "label": "cat", "note": ""}]
    with pytest.raises(BadInput) as e:
        read_csv_text("path,label,note\na.png,cat\n", tmp_path / "t.csv", short_rows=False)
    assert e.value.problem.startswith("line 2 has fewer fields than the header (2 of 3; no 'note' cell)")


# ------------------------------------------------------------------ a figure on its side of a many-digit gate
@pytest.mark.parametrize("threshold, figure", [(0.666666667, 2 / 3), (0.66666666, 2 / 3), (0.333333333, 1 / 3),
                                               (0.142857143, 1 / 7), (0.9999999, 9999998 / 10000000)])
def test_a_figure_is_shown_on_its_side_of_a_threshold_written_with_many_digits(threshold, figure):
    """`--fail-under-wga 0.666666667` with a worst group at 2/3: the gate failed (2/3 < 0.666666667) while
    the table beside it showed `66.6666667%`, the threshold itself (equal within 1e-9 of the percentage,
    more than float rounding). The figure's digits now go on until it is on its own side."""
    from repair.display import percent

    shown = percent(figure, against=[threshold])
    v = float(shown.rstrip("%"))
    assert (v < 100 * threshold) == (figure < threshold) and (v > 100 * threshold) == (figure > threshold), shown
    assert percent(0.8, against=[0.8]) == "80.0%" and percent(1999 / 2500, against=[0.8]) == "79.96%"


# ------------------------------------------------------------------ the embedding cache and the thread count
def test_an_embedding_cache_entry_is_keyed_by_the_cpu_threads_the_forward_pass_ran_on(tmp_path):
    """A convolution's sums are split among the threads: timm's embeddings on 1 and 2 threads differ in
    their last bits, and a one-thread `repair fix` served a two-thread run's cached embeddings wrote other
    weights (2e-3 apart) than the same run on a fresh cache, with `threads: 1` in its provenance. The
    thread count is in the CPU's cache key (an ONNX model's sessions run on the same count)."""
    import torch
    from conftest import make_images, make_timm_folder

    import repair
    from repair.embeddings import cache_key, forward_threads
    from repair.runtime import RuntimeOptions

    t = make_timm_folder(tmp_path / "m")
    img = make_images(tmp_path / "img", n_per_class=2, size=32)
    rt = RuntimeOptions(cache_dir=str(tmp_path / "cache"), progress=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not repair.evaluate(t, img, runtime=rt)["embedding"]["from_cache"]
        torch.set_num_threads(1)
        assert forward_threads() == 1
        assert not repair.evaluate(t, img, runtime=rt)["embedding"]["from_cache"]      # not the 2-thread entry
        assert repair.evaluate(t, img, runtime=rt)["embedding"]["from_cache"]          # its own
        m = repair.load_model(t)
        from repair.data import load_data

        d = load_data(img)
        one = cache_key(m, d, torch.device("cpu"))
        torch.set_num_threads(2)
        assert cache_key(m, d, torch.device("cpu")) != one
        assert cache_key(m, d, torch.device("cuda")) == cache_key(m, d, torch.device("cuda"))
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ SOURCE_DATE_EPOCH checked before any work
@pytest.mark.parametrize("value, words", [("99999999999999999999", "past the last date"),
                                          ("253402300800", "past the last date"),
                                          ("\u00b2", "not a whole number"), ("1.5", "not a whole number")])
def test_a_malformed_source_date_epoch_is_exit_2_before_any_work(tmp_path, monkeypatch, value, words):
    """A SOURCE_DATE_EPOCH past what a date holds (or `²`, which str.isdigit accepts) was an internal error
    (exit 3) raised when the provenance was written, after the whole repair ran. It is exit 2 naming the
    variable before any work; unset or empty it is no date, and a whole number of seconds is the date."""
    from conftest import make_images, make_timm_folder

    from repair.errors import BadInput
    from repair.provenance import source_date

    t = make_timm_folder(tmp_path / "m")
    img = make_images(tmp_path / "img", n_per_class=2, size=32)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    code, out, err = run_cli("fix", t, "--data", img, "--recipe", "dfr", "--out", tmp_path / "o", "-q")
    assert code == 2 and err.count("\n") == 1 and "SOURCE_DATE_EPOCH=" in err and words in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(BadInput, match=words):
        source_date()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", " ")
    assert source_date() is None
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    assert source_date() == "1970-01-02T00:00:00+00:00"
