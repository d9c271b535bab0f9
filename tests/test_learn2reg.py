"""Dataset folders, pair lists and atomic writing (scripts/learn2reg.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import HIPPO

from scripts.learn2reg import DatasetError, case_id, disp_name, pairs, training_cases, validation_cases

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "HippocampusMR"


def test_case_ids_and_disp_names():
    assert case_id("x/HippocampusMR_0201_0000.nii.gz") == "0201"
    assert case_id("NLST_0011_0001.nii.gz") == "0011"  # the last 4 digits are the modality
    assert case_id("hippocampus_017.nii.gz") == "0017"
    assert disp_name("0201", "0260") == "disp_0201_0000_0260_0000.nii.gz"
    assert disp_name("0201", "0260", "short") == "disp_0201_0260.nii.gz"
    with pytest.raises(ValueError, match="style"):
        disp_name("0201", "0260", "medium")
    with pytest.raises(DatasetError, match="case number"):
        case_id("image.nii.gz")


def test_learn2reg_folder_pairs_and_training_cases():
    val = pairs(str(SAMPLE), "registration_val")
    assert [(p["fixed_id"], p["moving_id"]) for p in val] == [
        ("0367", "0394"),
        ("0375", "0385"),
        ("0385", "0375"),
        ("0394", "0367"),
    ]
    assert all(
        Path(p[k]).is_absolute() and Path(p[k]).is_file() for p in val for k in p if k.endswith(("image", "label"))
    )
    train = training_cases(str(SAMPLE))
    held_out = {p["fixed_image"] for p in val}
    assert train and not held_out & {c["image"] for c in train}
    assert len(training_cases(str(SAMPLE), exclude_val=False)) == 8
    val_cases = validation_cases(str(SAMPLE))
    assert [c["id"] for c in val_cases] == ["0367", "0375", "0385", "0394"] and all("label" in c for c in val_cases)
    assert {c["image"] for c in val_cases} == held_out and len(train) + len(val_cases) == 8


@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"needs {HIPPO} (BUNDLE_TEST_DATA)")
def test_msd_folder_holds_out_the_last_cases_as_reversed_pairs():
    val = pairs(str(HIPPO), "registration_val", num_val=40)
    ids = sorted({p["fixed_id"] for p in val})
    assert len(val) == 40 and len(ids) == 40
    assert [p["moving_id"] for p in val] == [p["fixed_id"] for p in val][::-1]
    train = training_cases(str(HIPPO), num_val=40)
    assert len(train) == 160 and max(c["id"] for c in train) < min(ids)
    assert [c["id"] for c in validation_cases(str(HIPPO), num_val=40)] == ids
    odd = pairs(str(HIPPO), "registration_val", num_val=5)
    assert len(odd) == 4 and all(p["fixed_id"] != p["moving_id"] for p in odd)
    with pytest.raises(DatasetError, match="registration_test"):
        pairs(str(HIPPO), "registration_test")


def test_user_pair_lists_csv_and_json(tmp_path):
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text(
        "fixed,moving\n./imagesTr/HippocampusMR_0331_0000.nii.gz,./imagesTr/HippocampusMR_0338_0000.nii.gz\n"
    )
    (p,) = pairs(str(SAMPLE), str(csv_file))
    assert (p["fixed_id"], p["moving_id"]) == ("0331", "0338") and "fixed_label" in p
    json_file = tmp_path / "pairs.json"
    json_file.write_text(
        json.dumps(
            [
                {
                    "fixed": str(SAMPLE / "imagesTr/HippocampusMR_0351_0000.nii.gz"),
                    "moving": "./imagesTr/HippocampusMR_0356_0000.nii.gz",
                }
            ]
        )
    )
    assert pairs(str(SAMPLE), str(json_file))[0]["moving_id"] == "0356"


@pytest.mark.parametrize(
    "content, message",
    [
        ("fixed,moving\n", "missing or empty"),
        ("a,b\nx,y\n", "'fixed' and 'moving'"),
        ("fixed,moving\n./imagesTr/nope.nii.gz,./imagesTr/HippocampusMR_0338_0000.nii.gz\n", "does not exist"),
    ],
)
def test_bad_user_pair_lists_name_the_file(tmp_path, content, message):
    bad = tmp_path / "pairs.csv"
    bad.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        pairs(str(SAMPLE), str(bad))
    assert str(bad) in str(err.value)


def test_bad_dataset_folders(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        pairs(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="expected one"):
        pairs(str(tmp_path))
    data = tmp_path / "HippocampusMR"
    shutil.copytree(SAMPLE, data)
    index = data / "HippocampusMR_dataset.json"
    content = json.loads(index.read_text())
    content["registration_val"] = []
    index.write_text(json.dumps(content))
    assert len(training_cases(str(data))) == 8, "no validation pairs: every case trains"
    with pytest.raises(DatasetError, match="registration_val is missing or empty"):
        validation_cases(str(data))
    with pytest.raises(DatasetError, match="empty"):
        pairs(str(data), "registration_val")
    content["training"].append(dict(content["training"][0]))
    index.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="share the case ids"):
        training_cases(str(data))
    content["training"] = [{"label": "./labelsTr/HippocampusMR_0331_0000.nii.gz"}]
    index.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="needs an 'image'"):
        training_cases(str(data))
    # unlabelled scans are allowed (they train on the image terms only)
    content["training"] = [{"image": f"./imagesTr/HippocampusMR_{i}_0000.nii.gz"} for i in ("0331", "0338")]
    content["registration_val"] = []
    index.write_text(json.dumps(content))
    assert [sorted(c) for c in training_cases(str(data))] == [["id", "image"]] * 2


# --------------------------------------------------------------------------- output names
def test_output_names_follow_the_learn2reg_convention():
    from scripts.learn2reg import OutputName

    long, short = OutputName("long"), OutputName("short")
    assert long({"key": "ddf", "fixed_id": "0201", "moving_id": "0260"}) == {
        "subject": "disp_0201_0000_0260_0000",
        "idx": None,
    }
    assert short.name("ddf", "0201", "0260") == "disp_0201_0260"
    assert long.name("ddf_fixed_to_moving", "0201", "0260") == "disp_0260_0000_0201_0000"  # the reversed pair
    assert long.name("warped_label", "0201", "0260") == "warped_label_0201_0260"
    with pytest.raises(ValueError, match="'long' or 'short'"):
        OutputName("medium")


def test_colliding_output_names_name_both_pairs():
    from scripts.learn2reg import check_output_names

    pair = lambda f, m: {"fixed_id": f[-4:], "moving_id": m[-4:], "fixed_image": f, "moving_image": m}  # noqa: E731
    ok = [pair("/a/0001", "/a/0002"), pair("/a/0002", "/a/0001")]
    assert check_output_names(ok) == ok
    # with the reversed fields written too, the two pairs of one couple collide
    with pytest.raises(
        DatasetError,
        match="pair 2 .* would also write disp_0002_0000_0001_0000.nii.gz; with --write_fixed_to_moving True",
    ):
        check_output_names(ok, fixed_to_moving=True)
    with pytest.raises(
        DatasetError, match=r"pair 1 \(fixed /a/0001, moving /a/0002\) and another pair.*pair 2 \(fixed /b/0001"
    ):
        check_output_names([pair("/a/0001", "/a/0002"), pair("/b/0001", "/a/0002")])
    with pytest.raises(DatasetError, match="is listed twice"):
        check_output_names([pair("/a/0001", "/a/0002")] * 2)
