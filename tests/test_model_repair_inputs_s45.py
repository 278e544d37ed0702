"""A model repair's own inputs (model-repair-inputs audit, session 45): the data folder given as
--masks, the inputs recorded by content, a time cap that cuts the learning-rate schedule short, and a
--train set without the group column."""
from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import run_cli
from PIL import Image
from test_recompose import FAST, _recipe, scene  # noqa: F401  (the module's fixture)


def test_the_data_folder_given_as_masks_is_refused_before_any_work(scene, tmp_path):   # noqa: F811
    recipe = _recipe(tmp_path / "r.yaml", **FAST)
    code, _, err = run_cli("fix", scene["model"], "--data", scene["data"], "--recipe", recipe, "--group-by", "place",
                           "--masks", scene["data"], "--out", tmp_path / "o", "-q")
    assert code == 2 and "is the image itself" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_the_masks_are_recorded_by_content(scene, tmp_path):   # noqa: F811
    recipe = _recipe(tmp_path / "r.yaml", **FAST)
    other = tmp_path / "masks2"
    shutil.copytree(scene["masks"], other)
    first = sorted(p for p in other.rglob("*.png"))[0]
    arr = np.array(Image.open(first))
    Image.fromarray(np.ascontiguousarray(arr[:, ::-1])).save(first)         # one mask mirrored
    digests = []
    for i, masks in enumerate((scene["masks"], other)):
        code, out, err = run_cli("fix", scene["model"], "--data", scene["data"], "--recipe", recipe, "--group-by",
                                 "place", "--masks", masks, "--out", tmp_path / f"o{i}", "--json", "-q")
        assert code == 0, err
        digests.append(json.loads(out)["model_change"]["inputs"]["masks"]["sha256"])
    assert len(digests[0]) == 64 and digests[0] != digests[1]


def test_a_time_cap_that_cuts_the_schedule_short_is_said():
    from repair.modelrepair.finetune import schedule_cut_short

    loop = {"stopped_by": "budget:time", "steps": 87, "schedule": {"steps": 100000, "warmup_steps": 10000},
            "budget": {"steps": 100000, "seconds": 4}}
    assert "still in its 10000-step warmup" in schedule_cut_short(loop)
    assert "40% of the way" in schedule_cut_short({**loop, "steps": 40000})
    assert schedule_cut_short({**loop, "steps": 60000}) is None                    # past half: fine
    assert schedule_cut_short({**loop, "stopped_by": "budget:steps"}) is None
    members = {**loop, "steps": 90000, "budget": {"member_steps": [45000, 45000],        # each member's own
                                                   "member_stopped_by": ["budget:time", "budget:time"]}}
    assert "45% of the way" in schedule_cut_short(members)
    # the member the time cap cut is the one said (review: the last one's reason, every member's fewest steps)
    soup = {"schedule": {"steps": 1000, "warmup_steps": 100}, "stopped_by": "early stopping",
            "budget": {"member_steps": [30, 500], "member_stopped_by": ["budget:time", "early stopping"]}}
    assert "step 30 of the 1000" in schedule_cut_short(soup)
    soup = {**soup, "stopped_by": "budget:time",
            "budget": {"member_steps": [50, 900], "member_stopped_by": ["early stopping", "budget:time"]}}
    assert schedule_cut_short(soup) is None


def test_a_time_cap_that_cuts_the_schedule_short_reaches_the_warnings(scene, tmp_path):   # noqa: F811
    recipe = _recipe(tmp_path / "r.yaml", **FAST)
    code, out, err = run_cli("fix", scene["model"], "--data", scene["data"], "--recipe", recipe, "--group-by", "place",
                             "--masks", scene["masks"], "--budget", "100000steps,1s", "--out", tmp_path / "o",
                             "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["model_change"]["stopped_by"] == "budget:time"
    assert any("warmup" in w and "time cap" in w for w in rep["warnings"]), rep["warnings"]


def test_a_train_set_without_the_group_column_is_said(tmp_path):
    """clp balances its training by group; --train rows without the --group-by column were balanced by
    class only, silently."""
    from conftest import make_images, make_timm_folder

    model = make_timm_folder(tmp_path / "m")
    val = make_images(tmp_path / "d" / "val", n_per_class=6, seed=1)
    train = make_images(tmp_path / "d" / "train", n_per_class=2, seed=9, with_metadata=False)
    code, out, err = run_cli("fix", model, "--data", val, "--train", train, "--recipe", "clp", "--budget", "2steps",
                             "--group-by", "place", "--out", tmp_path / "o", "--json", "-q")
    assert code == 0, err
    warned = json.loads(out)["warnings"]
    assert any(w.startswith("--train has no 'place' column (--group-by)") for w in warned), warned


def test_masks_reached_through_a_linked_folder_are_in_the_digest(tmp_path):
    """Review: rglob does not enter a linked folder, so re-pointing masks/cat from v1 to v2 left the
    digest as it was."""
    from repair.provenance import input_digest

    m = tmp_path / "masks"
    for v, byte in (("v1", b"1"), ("v2", b"2")):
        (m / v).mkdir(parents=True)
        (m / v / "x.png").write_bytes(byte)
    (m / "cat").symlink_to("v1")
    a = input_digest(m)
    (m / "cat").unlink()
    (m / "cat").symlink_to("v2")
    assert input_digest(m) != a
    (m / "loop").symlink_to(".")                      # a link loop is walked once
    input_digest(m)
