"""A zoo row's refusal names what a manifest can set (session 47). The data and model loaders' advice
named command-line flags (``--label-col``, ``--allow-outside-paths``, ``--allow-pickle``) in a zoo row's
error too, where a manifest has fields, or (``--allow-pickle``) nothing at all. Each refusal's rule now
names options by their field (:class:`repair.rules.Worded`): the command line words it with flags, a
zoo with its fields, and advice no manifest field can follow is left out of a zoo's words. Each test
follows the zoo's advice and checks it works; every test here fails on the code before."""
from __future__ import annotations

import pickle

import pytest
import yaml

from conftest import make_images, make_timm_folder, run_cli


def _manifest(tmp_path, model, data, **row):
    (tmp_path / "out").mkdir(exist_ok=True)
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(yaml.safe_dump({"defaults": {"recipe": "dfr", "output_dir": str(tmp_path / "out")},
                                        "models": [{"name": "a", "checkpoint": str(model), "data": str(data),
                                                    **row}]}))
    return manifest


def _refusal(manifest) -> str:
    from repair.errors import BadInput
    from repair.zoo import load_manifest

    with pytest.raises(BadInput) as e:
        load_manifest(manifest)
    return str(e.value)


@pytest.fixture()
def parts(tmp_path):
    return make_timm_folder(tmp_path / "m"), make_images(tmp_path / "val", n_per_class=3)


def test_a_zoo_row_with_an_image_outside_its_data_is_told_the_field_that_allows_it(tmp_path, parts):
    from repair.zoo import load_manifest

    model, data = parts
    (tmp_path / "outside.png").write_bytes((data / "cat" / "000.png").read_bytes())
    table = data / "metadata.csv"
    table.write_text(table.read_text().replace("cat/000.png", "../outside.png", 1))
    msg = _refusal(_manifest(tmp_path, model, data))
    assert "leads outside the data folder" in msg and "--" not in msg.split("leads outside")[1], msg
    assert msg.endswith("or give allow_outside_paths: true"), msg
    assert load_manifest(_manifest(tmp_path, model, data, allow_outside_paths=True)).entries  # followed: read
    code, _, err = run_cli("eval", model, "--data", data, "-q", "--no-cache")               # the CLI's words
    assert code == 2 and err.strip().endswith("or give --allow-outside-paths"), err


def test_a_zoo_row_whose_label_column_is_not_found_is_told_the_field_that_names_it(tmp_path, parts):
    from repair.zoo import load_manifest

    model, data = parts
    table = data / "metadata.csv"
    table.write_text(table.read_text().replace("img_filename,y,", "img_filename,klass,", 1))
    msg = _refusal(_manifest(tmp_path, model, data))
    assert msg.endswith("name it with label_col"), msg
    assert load_manifest(_manifest(tmp_path, model, data, label_col="klass")).entries


def test_a_zoo_row_of_pickle_weights_is_not_told_of_an_option_a_manifest_has_not(tmp_path, parts):
    import torch
    from safetensors.torch import load_file

    from repair.adapters import load_model
    from repair.errors import BadInput
    from repair.zoo import error_record

    model, _ = parts
    pickled = tmp_path / "mp"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((model / "config.json").read_bytes())
    torch.save(load_file(model / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(BadInput) as e:
        load_model(pickled)
    assert "or pass --allow-pickle (loaded with weights_only=True)" in str(e.value)   # the CLI's words
    record = error_record(e.value)
    assert record["exit_code"] == 2 and record["error"].endswith("convert to model.safetensors"), record
    assert "allow" not in record["error"], record


def test_a_worded_refusal_puts_values_in_as_they_are_and_pickles_whole():
    from repair.rules import OptionRefused, Worded

    e = Worded("column {col} unknown[; name it with {label_col}]", {"col": "'{label_col} [x]'"},
               {"label_col": "--label-col"}, "t.csv")
    assert str(e) == "t.csv: column '{label_col} [x]' unknown; name it with --label-col"
    assert e.in_words(lambda name: None) == "t.csv: column '{label_col} [x]' unknown"
    assert e.in_words(lambda name: name) == "t.csv: column '{label_col} [x]' unknown; name it with label_col"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is Worded and str(again) == str(e) and again.path == "t.csv"
    o = OptionRefused("max_pixels", "must be {got}", {"got": "{max_pixels}"}, {"max_pixels": "--max-pixels"})
    assert str(o) == "--max-pixels must be {max_pixels}" and o.worded(str, with_subject=False) == "must be {max_pixels}"
    assert str(pickle.loads(pickle.dumps(o))) == str(o)
