"""How ``--masks`` are read: a mask of any depth by the images' own conversion, and found by one rule
(the check when the command starts and the training look under the same folders, in the same order)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from repair.errors import BadInput

CONFIG = {"input_size": [3, 16, 16], "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear",
          "mean": [0.5] * 3, "std": [0.5] * 3}


def _image(path: Path, side: int = 16) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(path)
    return path


def test_float_and_16bit_masks_are_read_by_their_depth_as_images_are(tmp_path):
    """Found by an audit: a mask went through PIL's ``convert("L")``: a float mask of 0..1 values came out
    all but empty (foreground share 0.0012 for 0.3066) and a soft 16-bit mask clipped to white, exit 0.
    Masks now take the images' one conversion of deep modes (:func:`repair.data.to_grey`), so the same
    mask saved as 8-bit, 16-bit or float reads alike."""
    from PIL import Image

    from repair.modelrepair.masks import load_masks

    data = tmp_path / "data"
    items = [_image(data / "a" / n) for n in ("u8.png", "u16.png", "f32.tif")]
    soft = np.zeros((16, 16), np.float64)
    soft[4:12, 2:10] = 1.0
    soft[0:4, :] = 0.5                                              # a soft edge
    masks = tmp_path / "masks" / "a"
    masks.mkdir(parents=True)
    Image.fromarray(np.rint(soft * 255).astype(np.uint8)).save(masks / "u8.png")
    Image.fromarray(np.rint(soft * 65535).astype(np.uint16)).save(masks / "u16.png")
    with Image.open(masks / "u16.png") as im:
        assert im.mode == "I;16"
    Image.fromarray(soft.astype(np.float32), "F").save(masks / "f32.tif")
    with Image.open(masks / "f32.tif") as im:
        assert im.mode == "F"
    m = load_masks(tmp_path / "masks", items, data, CONFIG)
    share = m.flatten(1).mean(1)
    assert abs(float(share[0]) - soft.mean()) < 0.01, share
    assert np.allclose(share.numpy(), float(share[0]), atol=0.005), share     # one reading of every depth
    assert float(m[1].max()) == 1.0 and float(m[1, 0, 0, 0]) == pytest.approx(0.5, abs=0.01)   # not clipped


def test_the_start_check_and_the_training_find_masks_by_one_rule_with_train(tmp_path):
    """Found by an audit: with ``--train``, masks laid out under the folder ``--data`` and ``--train`` share
    (what ``--masks``' help describes) were refused when the command started, the check looking under
    ``--data``'s folder alone while clp looked under the shared folder first: the two could read different
    files. One rule now (:func:`mask_sets`): the check with the train data finds the masks clp reads, and
    checks the train images' masks too."""
    from repair.data import load_data
    from repair.modelrepair.masks import check_masks_for_data, mask_files, mask_sets

    val, train, masks = tmp_path / "d" / "val", tmp_path / "d" / "train", tmp_path / "m"
    for root in (val, train):
        for c in ("a", "b"):
            _image(root / c / "x.png")
            _image(masks / root.name / c / "x.png")         # masks/val/a/x.png, masks/train/a/x.png
    vdata, tdata = load_data(val), load_data(train)
    check_masks_for_data(masks, vdata, tdata)               # refused before: no masks/a/x.png
    sets = mask_sets(vdata.items, vdata.source, tdata.items, str(train))     # as clp calls it (a TrainSet's source)
    assert mask_files(masks, sets) == [[masks / "train" / c / "x.png" for c in ("a", "b")],
                                       [masks / "val" / c / "x.png" for c in ("a", "b")]]
    (masks / "train" / "b" / "x.png").unlink()              # a train image without its mask: at the start
    with pytest.raises(BadInput) as e:
        check_masks_for_data(masks, vdata, tdata)
    assert "no mask" in e.value.problem and str(masks / "train" / "b" / "x.png") in e.value.problem
    # without --train: the data's own folder, as before
    own = tmp_path / "own"
    for c in ("a", "b"):
        _image(own / c / "x.png")
    check_masks_for_data(own, vdata)


def test_repair_fix_with_train_accepts_the_shared_mask_layout_and_checks_the_train_masks(tmp_path):
    """The command's start check is given the ``--train`` data (every input is read before the checks
    that compare them run): the layout ``--masks``' help describes for --data and --train sharing a
    folder was exit 2 at start; a train image without its mask is exit 2 naming it, before any work."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_images, make_timm_folder, run_cli
    from PIL import Image

    model = make_timm_folder(tmp_path / "m")
    val = make_images(tmp_path / "d" / "val", n_per_class=6, seed=1)
    train = make_images(tmp_path / "d" / "train", n_per_class=2, seed=9, with_metadata=False)
    masks = tmp_path / "masks"
    for root in (val, train):
        for f in root.rglob("*.png"):
            m = masks / root.name / f.relative_to(root)
            m.parent.mkdir(parents=True, exist_ok=True)
            a = np.zeros((36, 36), np.uint8)
            a[8:28, 8:28] = 255
            Image.fromarray(a).save(m)
    recipe = tmp_path / "clp-given.yaml"
    recipe.write_text("name: clp-given-test\ncandidates:\n  - method: clp\n    params:\n      masks: given\n")
    args = ["fix", model, "--data", val, "--train", train, "--masks", masks, "--recipe", recipe,
            "--budget", "2steps", "--group-by", "place", "--out", tmp_path / "o", "-q"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    gone = masks / "train" / "dog" / "001.png"
    gone.unlink()
    code, _, err = run_cli(*args[:-3], "--out", tmp_path / "o2", "-q")
    assert code == 2 and "no mask" in err and str(gone) in err and err.count("\n") == 1, err
    assert not (tmp_path / "o2").exists()
