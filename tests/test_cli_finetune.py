"""`napari-medseg finetune`: fine-tune on chosen slices of a label volume, write a loadable model."""

import json
import os
import shlex

import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.cli_finetune import parse_slices
from napari_medseg.core.io import write_nifti
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import generate_phantom


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    p = generate_phantom((12, 80, 80), (4.0, 2.0, 2.0), seed=3, n_lesions=1)
    write_nifti(d / "image.nii.gz", p.volume.array, p.volume.spacing, p.volume.origin)
    write_nifti(d / "labels.nii.gz", p.labels, p.volume.spacing, p.volume.origin)
    return d, p


def test_parse_slices():
    assert parse_slices("10, 20,22-24") == [10, 20, 22, 23, 24]
    for bad in ("", "a", "5-3", "1,,x", "0-99999999999"):  # the last: refused, not built
        with pytest.raises(Exception, match="slices"):
            parse_slices(bad)


def test_finetune_writes_a_model_every_command_loads(case, tmp_path, capsys):
    d, p = case
    out = tmp_path / "models"
    rc = main(["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
               str(d / "labels.nii.gz"), "--slices", "3,6,9", "--out", str(out), "--epochs", "2",
               "--name", "mine", "--quiet", "--threads", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["slices"] == [3, 6, 9] and report["steps"] == 6
    assert "note:" not in captured.err  # no new structure: no advice
    model, card = load_model(out / "mine.json")
    assert card["finetuned_from"]["name"] == "segmenter"
    assert "--slices 3,6,9" in card["finetune_history"][-1]["command"]
    seg = tmp_path / "seg.nii.gz"
    assert main(["segment", str(d / "image.nii.gz"), str(seg), "--model", str(out / "mine.json"),
                 "--quiet"]) == 0
    assert seg.is_file()
    # the same name again without --overwrite is refused, and nothing changes
    before = sorted(x.name for x in out.iterdir())
    assert main(["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
                 str(d / "labels.nii.gz"), "--slices", "3", "--out", str(out), "--name", "mine",
                 "--epochs", "1"]) == 2
    assert sorted(x.name for x in out.iterdir()) == before


def test_a_card_records_the_threads_and_each_rounds_starting_model(case, tmp_path, capsys):
    """Cards named neither the thread count (a fixed number of steps gives other weights
    on another count) nor, in a chain, the model a round started from."""
    d, _ = case
    out = tmp_path / "my models"  # a space: the command was recorded unquoted
    common = ["--image", str(d / "image.nii.gz"), "--labels", str(d / "labels.nii.gz"),
              "--slices", "3, 6", "--out", str(out), "--epochs", "1", "--quiet"]
    assert main(["finetune", "segmenter", *common, "--name", "first"]) == 0
    first = load_model(out / "first.json")[1]
    command = first["finetune_history"][-1]["command"]
    assert " --threads " in command
    assert main(["finetune", str(out / "first.json"), *common, "--name", "second"]) == 0
    second = load_model(out / "second.json")[1]
    assert second["finetune_history"][-1]["from"]["sha256"] == first["sha256"]
    assert second["finetuned_from"]["name"] == "segmenter"
    # --model, as segment and detect take it (it was refused: "unrecognized arguments")
    assert main(["finetune", "--model", str(out / "first.json"), *common, "--name", "third"]) == 0
    assert load_model(out / "third.json")[1]["finetuned_from"]["name"] == "segmenter"
    capsys.readouterr()
    assert main(["finetune", "detector", "--model", "segmenter", *common, "--name", "x"]) == 2
    assert "two models given" in capsys.readouterr().err
    # the recorded command gives the same weights again
    again = shlex.split(command)[1:]  # drop "napari-medseg"
    again[again.index("--name") + 1] = "again"
    assert main(again) == 0
    a, b = load_model(out / "again.json")[0].state_dict(), load_model(out / "first.json")[0].state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # a write-protected model is refused before the training, not after it
    os.chmod(out / "first.json", 0o444)
    assert main(["finetune", "segmenter", *common, "--name", "first", "--overwrite"]) == 2
    assert "first.json: the file is read-only; --overwrite cannot replace it" in capsys.readouterr().err
    # 0 ("torch's own count") cannot be recorded, so a fixed-steps run could not be redone
    # (said as the arguments are read, as for any other count: the shared text offered
    # "0: torch's own setting" and finetune then refused 0)
    with pytest.raises(SystemExit) as exited:
        main(["finetune", "segmenter", *common, "--name", "zero", "--threads", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "1 or more (recorded in the card)" in err and "torch's own" not in err


@pytest.mark.parametrize("labels_from, slices, message", [
    ("image", "3", "whole numbers"),
    ("small", "3", "shape"),
    ("zeros", "3", "only background"),
    ("labels", "40", "outside the volume"),
    ("labels", "0-99999", "outside the volume (0–11)"),  # one short line, not 99 988 numbers
    ("labels", "x", "--slices"),
    ("spacing", "3", "not drawn on this image"),  # same shape, another grid
    ("shifted", "3", "not drawn on this image"),
    ("flipped", "3", "not drawn on this image"),  # read as LPS: it starts elsewhere
    ("huge", "3", "found 0–1e+20"),  # cast to int64 it read -9.2e18, with numpy's warning
])
def test_bad_input_exit_2_one_line_no_output(case, tmp_path, capsys, labels_from, slices, message):
    d, p = case
    labels = {"image": d / "image.nii.gz", "labels": d / "labels.nii.gz"}.get(labels_from)
    if labels is None:
        labels = tmp_path / "l.nii.gz"
        data = np.zeros((12, 40, 40) if labels_from == "small" else p.labels.shape, np.uint8)
        spacing, origin, axes = p.volume.spacing, p.volume.origin, None
        if labels_from in ("spacing", "shifted", "flipped"):
            data = p.labels
        if labels_from == "spacing":
            spacing = (1.0, 0.5, 0.5)
        if labels_from == "shifted":
            origin = (origin[0] + 100.0, origin[1], origin[2])
        if labels_from == "flipped":  # x runs the other way: a mirrored label map
            axes = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]
        if labels_from == "huge":
            data = p.labels.astype(np.float32)
            data[3, 0, 0] = 1e20
        write_nifti(labels, data, spacing, origin, axes=axes)
    out = tmp_path / "out"
    rc = main(["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels", str(labels),
               "--slices", slices, "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_a_budget_too_short_for_one_step_still_trains_one(case, tmp_path, capsys):
    """It wrote the untrained copy as a fine-tuned model ("0 steps") and exited 0; then it
    was refused; now every training run makes at least one step (as `train` does)."""
    d, _ = case
    out = tmp_path / "out"
    rc = main(["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
               str(d / "labels.nii.gz"), "--slices", "3", "--out", str(out),
               "--seconds", "0.000001", "--quiet", "--threads", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and report["steps"] == 1
    model, card = load_model(out / "segmenter-finetuned.json")
    assert card["finetune_history"][-1]["steps"] == 1


def test_values_on_slices_not_given_are_ignored_not_refused(case, tmp_path, capsys):
    """A fractional or NaN value on a slice not trained on refused the whole run
    ("labels must be whole numbers"), though other slices are ignored."""
    d, p = case
    labels = p.labels.astype(np.float32)
    labels[10, 0, 0], labels[11, 0, 0] = 0.5, np.nan
    write_nifti(tmp_path / "l.nii.gz", labels, p.volume.spacing, p.volume.origin)
    args = ["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
            str(tmp_path / "l.nii.gz"), "--epochs", "1", "--quiet", "--threads", "1", "--out"]
    assert main([*args, str(tmp_path / "ok"), "--slices", "3"]) == 0
    assert main([*args, str(tmp_path / "no"), "--slices", "3,10"]) == 2
    assert "whole numbers on the slices given" in capsys.readouterr().err


def test_finetune_detector_from_a_points_csv(case, tmp_path, capsys):
    d, p = case
    les = p.lesions[0]
    csv_path = tmp_path / "lesions.csv"
    csv_path.write_text("z,y,x,score,diameter_mm\n"
                        f"{les.center_zyx[0]},{les.center_zyx[1]},{les.center_zyx[2]},1.0,{2 * les.radius_mm}\n")
    z = int(round(les.center_zyx[0]))
    out = tmp_path / "m"
    assert main(["finetune", "detector", "--image", str(d / "image.nii.gz"), "--points", str(csv_path),
                 "--slices", f"{z},{z + 1}", "--out", str(out), "--epochs", "1", "--quiet",
                 "--threads", "1"]) == 0
    model, card = load_model(out / "detector-finetuned.json")
    assert card["architecture"] == "LesionDetector" and "--points" in card["finetune_history"][-1]["command"]
    assert main(["detect", str(d / "image.nii.gz"), str(tmp_path / "det.csv"), "--model",
                 str(out / "detector-finetuned.json"), "--quiet"]) == 0
    capsys.readouterr()
    # labels for a detector, or both / neither of --labels and --points: refused
    for extra in (["--labels", str(d / "labels.nii.gz")], [],
                  ["--labels", str(d / "labels.nii.gz"), "--points", str(csv_path)]):
        assert main(["finetune", "detector", "--image", str(d / "image.nii.gz"), "--slices", "3",
                     "--out", str(tmp_path / "x"), *extra]) == 2
    assert not (tmp_path / "x").exists()
    # a CSV that names no z, y, x columns is not "no lesions": refused (a header alone is)
    for text in ("", "a,b\n1,2\n"):
        (tmp_path / "bad.csv").write_text(text)
        capsys.readouterr()
        assert main(["finetune", "detector", "--image", str(d / "image.nii.gz"), "--points",
                     str(tmp_path / "bad.csv"), "--slices", "3", "--out", str(tmp_path / "x")]) == 2
        assert "header naming columns z, y, x" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_short_round_on_a_new_structure_advises_a_longer_one(case, tmp_path, capsys):
    d, p = case
    labels = p.labels.copy()
    labels[6][p.labels[6] == 6] = 12  # the spine painted as a new value on slice 6
    path = tmp_path / "new.nii.gz"
    write_nifti(path, labels, p.volume.spacing, p.volume.origin)
    assert main(["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels", str(path),
                 "--slices", "6", "--out", str(tmp_path / "m"), "--epochs", "2", "--quiet",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["new_classes"] and report["steps"] == 2
    assert "note: a new structure is learnt from scratch" in captured.err
    assert "round made 2: " in captured.err and "--seconds ≥ " in captured.err


@pytest.mark.parametrize("extra, message", [
    (["--name", "bad?name"], "model name must be"),
    (["--out", "{image}/sub"], "--out cannot be created"),
    (["--seed", "-1"], "--seed must be"),
    # refused by the save only after the round ran (a suffix, a file name too long)
    (["--name", "mine.json"], "must not end in a file suffix"),
    (["--name", "a" * 235], "at most 200 characters"),
    (["--epochs", "99999999999999999999"], "--epochs must be 1..10000"),  # ran for days
])
def test_names_folders_and_seeds_are_checked_before_training(case, tmp_path, capsys, monkeypatch,
                                                            extra, message):
    from napari_medseg.core import finetune

    monkeypatch.setattr(finetune, "finetune_segmenter", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("trained before checking its arguments")))
    d, p = case
    argv = ["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
            str(d / "labels.nii.gz"), "--slices", "3", "--out", str(tmp_path / "o"), "--epochs", "1"]
    argv += [a.format(image=d / "image.nii.gz") for a in extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_bundled_name_is_refused_in_the_user_models_folder(case, tmp_path, capsys,
                                                             monkeypatch):
    """Saved there as "segmenter", the fine-tuned copy was loaded for every command and
    widget that names the bundled segmenter (the Retrain widget refused the name)."""
    from napari_medseg.core import finetune

    monkeypatch.setattr(finetune, "finetune_segmenter", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("trained before checking its arguments")))
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    d, p = case
    argv = ["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
            str(d / "labels.nii.gz"), "--slices", "3", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "home" / "models"), "--name", "segmenter"]) == 2
    assert "bundled model's name" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_finetune_says_what_the_reader_warns_and_names_synthetic_slices(case, tmp_path,
                                                                       capsys):
    """finetune read the image without a word: a file `generate` made trained on its
    synthetic slices as if acquired, where every other command warns."""
    d, p = case
    image = tmp_path / "x2.nii.gz"
    write_nifti(image, p.volume.array, p.volume.spacing, p.volume.origin,
                description="napari-medseg: SYNTHETIC slices (linear), not for diagnosis",
                info={"synthetic": True, "slice_axis": "z", "generated_slices": [1, 3, 5]})
    assert main(["finetune", "segmenter", "--image", str(image), "--labels",
                 str(d / "labels.nii.gz"), "--slices", "2,3,4,5", "--out", str(tmp_path / "m"),
                 "--epochs", "1", "--quiet", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "finetune: warning: 3 slices of this file were generated" in err
    assert "finetune: warning: 2 annotated slices (3, 5) were generated (synthetic)" in err


def test_points_csv_headers_as_spreadsheets_write_them(tmp_path):
    from napari_medseg.cli_finetune import read_points_csv
    from napari_medseg.core.errors import MedsegInputError

    for text in ("\ufeffz,y,x,diameter_mm\n5,36,27,8\n",  # Excel "CSV UTF-8": a BOM
                 "Z, Y, X\n5,36,27\n"):
        (tmp_path / "p.csv").write_text(text, encoding="utf-8")
        pts, diam = read_points_csv(str(tmp_path / "p.csv"))
        assert pts.tolist() == [[5.0, 36.0, 27.0]]
    (tmp_path / "p.csv").write_text("z,y,x,z\n5,36,27,9\n")  # it took z = 9 silently
    with pytest.raises(MedsegInputError, match="names column z twice"):
        read_points_csv(str(tmp_path / "p.csv"))


def test_a_saved_detection_layer_reads_back_whatever_the_locale(tmp_path, monkeypatch):
    """The writer used the locale's encoding and `finetune --points` reads UTF-8: on
    Windows (cp1252) a detection's label "0.90 · 12 mm" was written as byte 0xb7 and the
    file could not be read back; on an ASCII locale the save failed."""
    from napari_medseg import cli
    from napari_medseg._writer import write_points_csv
    from napari_medseg.cli_finetune import read_points_csv

    fdopen = os.fdopen

    def locale_cp1252(fd, mode="r", *args, **kwargs):  # open()'s default on Windows
        kwargs.setdefault("encoding", "cp1252")
        return fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(cli.os, "fdopen", locale_cp1252)
    path = tmp_path / "lesions.csv"
    meta = {"scale": (2.0, 1.0, 1.0), "translate": (0.0, 0.0, 0.0),
            "features": {"score": [0.9], "diameter_mm": [12.0], "label": ["0.90 · 12 mm"],
                         "organ": ["肝臓"]}}
    assert write_points_csv(str(path), np.array([[3.0, 10.0, 12.0]]), meta) == [str(path)]
    assert "0.90 · 12 mm" in path.read_text(encoding="utf-8")
    from napari_medseg.core.volume import Volume

    volume = Volume(np.zeros((10, 40, 40), np.float32), spacing=(2.0, 1.0, 1.0))
    voxels, diameters = read_points_csv(str(path), volume)
    assert voxels.tolist() == [[3.0, 10.0, 12.0]] and diameters.tolist() == [12.0]


def test_features_named_like_coordinates_do_not_become_coordinates(tmp_path):
    """A feature "index" or "axis-0" repeated the coordinate columns' names: napari's
    reader reopened 3D points as 4D."""
    import csv

    from napari_medseg._writer import write_points_csv

    path = tmp_path / "p.csv"
    meta = {"scale": (1.0, 1.0, 1.0), "features": {"index": [7, 8], "axis-0": [1, 2],
                                                   "feature_index": ["a", "b"]}}
    write_points_csv(str(path), np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]), meta)
    with open(path, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == ["index", "axis-0", "axis-1", "axis-2", "feature_index",
                      "feature_axis-0", "feature_feature_index"]
    assert rows[1] == ["1", "3", "4", "5", "8", "2", "b"]


def test_saving_points_with_none_shown_warns_that_napari_cannot_reopen_it(tmp_path,
                                                                        monkeypatch):
    """A header-only CSV (no findings, or every detection below the threshold) was
    written in silence; napari's reader fails on it with an IndexError."""
    from napari_medseg import _writer
    from napari_medseg.cli_finetune import read_points_csv
    from napari_medseg.core.volume import Volume

    said = []
    monkeypatch.setattr(_writer, "_say", lambda m, warning=False: said.append((m, warning)))
    path = tmp_path / "none.csv"
    meta = {"scale": (1.0, 1.0, 1.0), "shown": [False], "features": {"score": [0.1]}}
    _writer.write_points_csv(str(path), np.array([[1.0, 2.0, 3.0]]), meta)
    assert path.read_text(encoding="utf-8").strip() == "index,axis-0,axis-1,axis-2,score"
    assert any("only its header" in m and warning for m, warning in said), said
    volume = Volume(np.zeros((4, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0))
    assert read_points_csv(str(path), volume)[0].shape == (0, 3)
    said.clear()
    _writer.write_points_csv(str(path), np.array([[1.0, 2.0, 3.0]]), {**meta, "shown": [True]})
    assert not any("only its header" in m for m, _ in said)


def test_phantom_lesion_csv_gives_its_sizes(tmp_path):
    """phantom's lesions.csv says radius_mm: its sizes were dropped (every lesion 10 mm)."""
    from napari_medseg.cli_finetune import read_points_csv
    from napari_medseg.core.errors import MedsegInputError

    (tmp_path / "lesions.csv").write_text("z,y,x,radius_mm\n5,36,27,4.5\n")
    _, diam = read_points_csv(str(tmp_path / "lesions.csv"))
    assert diam.tolist() == [9.0]
    (tmp_path / "both.csv").write_text("z,y,x,radius_mm,diameter_mm\n5,36,27,4.5,9\n")
    with pytest.raises(MedsegInputError, match="both"):
        read_points_csv(str(tmp_path / "both.csv"))


def test_a_chain_of_rounds_counts_its_versions_and_rotates_the_held_out_slice(case, tmp_path,
                                                                                capsys):
    """Every link of a command-line chain was "+ft1", recorded as version 1, and held out
    the same slice. A later link holds out none of the slices an earlier one trained on
    (its score there is no held-out score): with the same slices, none."""
    d, _ = case
    out = tmp_path / "models"
    common = ["--image", str(d / "image.nii.gz"), "--labels", str(d / "labels.nii.gz"),
              "--out", str(out), "--epochs", "1", "--quiet", "--threads", "1"]
    assert main(["finetune", "segmenter", *common, "--slices", "3,6,7", "--name", "first"]) == 0
    assert main(["finetune", str(out / "first.json"), *common, "--slices", "3,6,7",
                 "--name", "again"]) == 0
    assert main(["finetune", str(out / "first.json"), *common, "--slices", "3,6,7,8",
                 "--name", "second"]) == 0
    second = load_model(out / "second.json")[1]
    assert second["version"].endswith("+ft2")
    history = second["finetune_history"]
    assert [h["version"] for h in history] == [1, 2]
    assert [h["holdout_slice"] for h in history] == [3, 8]
    assert load_model(out / "again.json")[1]["finetune_history"][-1]["holdout_slice"] is None


def test_an_output_name_taken_by_a_folder_is_refused_before_training(case, tmp_path, capsys):
    """--overwrite passed the check, then the finished round failed naming a temp file
    ('.mine.json.x1y2.tmp: Is a directory')."""
    d, _ = case
    out = tmp_path / "models"
    (out / "mine.json").mkdir(parents=True)
    rc = main(["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
               str(d / "labels.nii.gz"), "--slices", "3", "--out", str(out), "--name", "mine",
               "--epochs", "1", "--overwrite"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mine.json in --out is a folder" in err and ".tmp" not in err
    assert [p.name for p in out.iterdir()] == ["mine.json"]


def test_a_bad_line_of_the_points_csv_is_named(tmp_path):
    """A hand-corrected list of dozens of points said only "needs numeric columns" or
    "2 points lie outside the image": no line to look at."""
    from types import SimpleNamespace

    from napari_medseg.cli_finetune import read_points_csv
    from napari_medseg.core.errors import MedsegInputError

    volume = SimpleNamespace(shape=(8, 64, 64), origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    cases = {"z,y,x\n1,2,3\n4,,6\n": "line 3: the CSV needs numeric columns",
             "z,y,x,diameter_mm\n1,2,3,5\n2,3,4,6\n1,nan,3,5\n": "line 4: coordinates must be finite",
             "z,y,x\n1,2,3\n20,2,3\n": "line 3: the point lies outside the image (8, 64, 64)"}
    for text, said in cases.items():
        path = tmp_path / "p.csv"
        path.write_text(text)
        with pytest.raises(MedsegInputError, match=said.replace("(", r"\(").replace(")", r"\)")):
            read_points_csv(str(path), volume)
    path.write_text("z,y,x,radius_mm\n1,2,3,4\n")
    pts, diam = read_points_csv(str(path), volume)
    assert pts.tolist() == [[1.0, 2.0, 3.0]] and diam.tolist() == [8.0]


def test_a_label_map_numbered_otherwise_is_refused_and_a_new_structures_name_kept(
        case, tmp_path, capsys):
    """The names a label map carries were dropped: liver and spleen swapped (another
    tool's numbering) trained the model to call the liver spleen, and a new structure
    named 'stomach' in the file became 'structure_12' in the card."""
    from napari_medseg.core.phantom import LABEL_NAMES

    d, p = case
    names = dict(LABEL_NAMES)
    swapped = p.labels.copy()
    swapped[p.labels == 2], swapped[p.labels == 3] = 3, 2
    path = tmp_path / "swapped.nii.gz"
    write_nifti(path, swapped, p.volume.spacing, p.volume.origin, labels=True,
                label_names={**names, 2: names[3], 3: names[2]})
    args = ["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--epochs", "1",
            "--quiet", "--threads", "1"]
    assert main([*args, "--labels", str(path), "--slices", "3,6", "--out",
                 str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert ("2 is 'spleen' in the file, 'liver' in the model" in err
            or "3 is 'liver' in the file, 'spleen' in the model" in err), err
    assert err.count("\n") == 1 and not (tmp_path / "no").exists()
    labels = p.labels.copy()
    labels[6][p.labels[6] == 6] = 12
    path = tmp_path / "named.nii.gz"
    write_nifti(path, labels, p.volume.spacing, p.volume.origin, labels=True,
                label_names={**names, 12: "stomach"})
    assert main([*args, "--labels", str(path), "--slices", "6", "--out",
                 str(tmp_path / "m")]) == 0
    _, card = load_model(tmp_path / "m" / "segmenter-finetuned.json")
    assert card["classes"][12] == "stomach"


def test_a_points_csv_with_a_negative_size_names_its_line_and_counts_only_reviewed_points(
        case, tmp_path, capsys):
    d, p = case
    bad = tmp_path / "neg.csv"
    bad.write_text("z,y,x,diameter_mm\n5,40,40,8\n6,41,22,-3\n")
    args = ["finetune", "detector", "--image", str(d / "image.nii.gz"), "--epochs", "1",
            "--quiet", "--threads", "1"]
    assert main([*args, "--points", str(bad), "--slices", "5", "--out", str(tmp_path / "x")]) == 2
    assert "line 3: diameter_mm must be positive" in capsys.readouterr().err
    good = tmp_path / "ok.csv"
    good.write_text("z,y,x,diameter_mm\n5,40,40,8\n9,41,22,6\n")
    assert main([*args, "--points", str(good), "--slices", "4-6", "--out",
                 str(tmp_path / "m")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["corrections"] == 1  # the point on slice 9 was not reviewed


def test_names_for_placeholder_classes_and_other_spellings_are_accepted(case, tmp_path,
                                                                        capsys):
    """A file naming the model's structure_N / unused_N placeholders, or 'Kidney left' for
    kidney_left, was refused as numbered otherwise ("renumber them")."""
    from napari_medseg.cli_finetune import check_label_names

    d, p = case
    classes = ["background", "body", "liver", "kidney_left", "unused_4", "structure_5"]
    labels = np.zeros((2, 4, 8), np.int64)
    labels[0, 0, :6] = [0, 1, 2, 3, 4, 5]
    check_label_names({2: " Liver", 3: "Kidney left", 4: "duodenum", 5: "stomach"},
                      classes, labels, [0], "x.nii.gz")
    # another tool's spelling of the same structure (3D Slicer's word order, "(L)")
    for spelling in ("Left kidney", "Kidney (L)", "kidney-left"):
        check_label_names({3: spelling}, classes, labels, [0], "x.nii.gz")
    with pytest.raises(Exception, match="3 is 'Right kidney' in the file"):
        check_label_names({3: "Right kidney"}, classes, labels, [0], "x.nii.gz")
    with pytest.raises(Exception, match="2 is 'spleen' in the file, 'liver' in the model"):
        check_label_names({2: "spleen"}, classes, labels, [0], "x.nii.gz")


def test_finetune_says_its_nan_slices_are_left_out_of_training(case, tmp_path, capsys):
    """It said a NaN slice was "left without a result", the inference commands' words."""
    d, p = case
    image = p.volume.array.copy()
    image[5] = np.nan
    image[3, :10, :10] = np.nan
    write_nifti(tmp_path / "i.nii.gz", image, p.volume.spacing, p.volume.origin)
    assert main(["finetune", "segmenter", "--image", str(tmp_path / "i.nii.gz"), "--labels",
                 str(d / "labels.nii.gz"), "--slices", "3", "--epochs", "1", "--quiet",
                 "--threads", "1", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "at z=5: taken as missing, left out of training" in err, err
    assert "100 voxels without a value (NaN) on slice 3: ignored by the loss" in err, err


def test_class_names_name_a_new_structure_from_the_command_line(case, tmp_path, capsys):
    """From a .npy or another tool's NIfTI a new structure could only be called
    structure_12: the card refused a rename ("edited or damaged")."""
    from napari_medseg.core.models import load_model

    d, p = case
    labels = p.labels.copy()
    labels[6][p.labels[6] == 6] = 12
    np.save(tmp_path / "new.npy", labels)
    args = ["finetune", "segmenter", "--image", str(d / "image.nii.gz"), "--labels",
            str(tmp_path / "new.npy"), "--slices", "6", "--epochs", "1", "--quiet",
            "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "m"), "--class-names", "12=gallbladder"]) == 0
    _model, card = load_model(tmp_path / "m" / "segmenter-finetuned.json")
    assert card["classes"][12] == "gallbladder"
    assert "--class-names 12=gallbladder" in card["finetune_history"][-1]["command"]
    capsys.readouterr()
    for bad, said in (("12", "VALUE=NAME pairs"), ("0=air", "0 is the background"),
                      ("2=spleen", "--class-names names new structures; 2 is 'liver' in "
                                   "the model, not 'spleen'")):
        assert main([*args, "--out", str(tmp_path / "x"), "--class-names", bad]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
