"""Bad input and faults, one test per kind (issue 14): each ends in an error naming the thing at fault,
or in correct handling with nothing lost. The kinds covered elsewhere are listed in the module docstrings
of tests/test_shell_safety.py and tests/test_safe_files.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES, cli_error
from PIL import Image

from pathmamba.cli import main as cli_main
from pathmamba.core.download import DownloadFailed, download_file
from pathmamba.core.errors import InputError
from pathmamba.data import acquire
from pathmamba.data.acquire import ArchiveError, ChecksumMismatch, prepare_dataset
from pathmamba.data.readers import MaskError, read_mask
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset, zip_folder
from pathmamba.data.validate import check_validated, dataset_fingerprint, validate_dataset
from pathmamba.engine.registry import build_method

LUAD = get_dataset_spec("synthetic-luad")
SIZE = 32


@pytest.fixture
def luad(canonical, tmp_path) -> Path:
    """A copy of the canonical dataset for one test to damage."""
    return Path(shutil.copytree(canonical, tmp_path / "luad"))


# --- masks and their palettes (item 3) -----------------------------------------------------------------


def _resave_with_palette_order(path: Path, order: list[int]) -> None:
    """Re-save a P-mode mask with the same colours at other palette indices: class c at index order[c]."""
    classes = read_mask(path, LUAD)
    image = Image.fromarray(np.array(order, dtype=np.uint8)[classes], mode="P")
    flat = [0] * 768
    for cls, index in enumerate(order):
        flat[3 * index:3 * index + 3] = LUAD.palette[cls]
    image.putpalette(flat)
    image.save(path)


def test_mask_resaved_with_a_permuted_palette_reads_to_the_same_classes(luad, canonical):
    masks = sorted((luad / "test" / "mask").glob("*.png"))
    for path in masks:
        _resave_with_palette_order(path, [3, 0, 4, 1, 2])
    for path in masks:
        assert not np.array_equal(np.asarray(Image.open(path)), read_mask(path, LUAD))  # raw indices moved
        np.testing.assert_array_equal(read_mask(path, LUAD), read_mask(canonical / "test" / "mask" / path.name, LUAD))
    report = validate_dataset(luad, LUAD, image_size=SIZE)
    assert report.ok
    assert report.tolerated == [f"test: 3 of 3 masks have a palette other than {LUAD.name}'s; read by colour"]


def test_archive_with_masks_in_another_palette_order_is_prepared_in_the_dataset_palette(luad, canonical, tmp_path):
    for path in (luad / "val" / "mask").glob("*.png"):
        _resave_with_palette_order(path, [3, 0, 4, 1, 2])
    out = tmp_path / "out"
    prepare_dataset(LUAD, [zip_folder(luad, tmp_path / "luad.zip")], out, tmp_path / "lock.json")
    for path in (canonical / "val" / "mask").glob("*.png"):  # the same indices and palette as generated
        with Image.open(path) as expected, Image.open(out / "val" / "mask" / path.name) as found:
            assert np.array_equal(np.asarray(found), np.asarray(expected))
            assert found.getpalette() == expected.getpalette()


def test_mask_palette_colour_outside_the_dataset_palette_is_refused_naming_the_file(luad):
    path = min((luad / "val" / "mask").glob("*.png"))
    image = Image.open(path)
    index = int(np.asarray(image)[0, 0])
    flat = image.getpalette("RGB")
    flat[3 * index:3 * index + 3] = [1, 2, 3]
    image.putpalette(flat)
    image.save(path)
    with pytest.raises(MaskError, match=rf"{path.name}: mask value {index} at row 0, column 0 has the colour "
                                        r"\(1, 2, 3\), not in the synthetic-luad palette"):
        read_mask(path, LUAD)
    report = validate_dataset(luad, LUAD, image_size=SIZE)
    assert [(p.path, p.kind) for p in report.problems] == [(str(path), "mask values")]


def test_p_mode_mask_saved_without_a_palette_is_refused_naming_the_file(tmp_path):
    # PIL gives such a file a one-colour palette and renumbers its indices: reading the raw indices would
    # give other classes without a word.
    path = tmp_path / "no-palette.png"
    Image.fromarray(np.array([[4, 3], [0, 1]], dtype=np.uint8), mode="P").save(path)
    with pytest.raises(MaskError, match=r"no-palette\.png: mask value \d at row \d, column \d has "):
        read_mask(path, LUAD)


# --- archives and downloads (item 5) --------------------------------------------------------------------


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _zip(archive: Path, folder: Path, names: list[str]) -> Path:
    """A zip of the files ``names`` (relative to ``folder``) under the top entry ``folder.name``."""
    with zipfile.ZipFile(archive, "w") as handle:
        for name in names:
            handle.write(folder / name, f"{folder.name}/{name}")
    return archive


def test_two_parts_holding_the_same_path_are_refused_naming_both(canonical, tmp_path):
    files = _files(canonical)
    first = _zip(tmp_path / "part-1.zip", canonical, files)
    second = _zip(tmp_path / "part-2.zip", canonical, files[:1])  # a file of part 1 again
    out, lock = tmp_path / "out", tmp_path / "lock.json"
    with pytest.raises(ArchiveError) as error:
        prepare_dataset(LUAD, [first, second], out, lock)
    assert str(error.value).startswith(f"luad/{files[0]}: in both {first} and {second}; ")
    assert not out.exists() and not lock.exists() and first.exists() and second.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["part-1.zip", "part-2.zip"]  # nothing extracted


def test_a_path_twice_in_one_archive_is_refused(canonical, tmp_path):
    archive = _zip(tmp_path / "twice.zip", canonical, _files(canonical))
    with zipfile.ZipFile(archive, "a") as handle:
        handle.writestr("luad/training/extra.txt", b"1")
        with pytest.warns(UserWarning, match="Duplicate name"):
            handle.writestr("luad/training/extra.txt", b"2")
    with pytest.raises(ArchiveError, match=rf"^luad/training/extra\.txt: twice in {archive}; "):
        prepare_dataset(LUAD, [archive], tmp_path / "out", tmp_path / "lock.json")


def test_zip_bomb_is_refused_before_extraction_naming_the_member(canonical, tmp_path):
    bomb = _zip(tmp_path / "bomb.zip", canonical, _files(canonical))
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("luad/zeros.bin", bytes(20_000_000))  # 20 MB from about 20 kB
    with pytest.raises(ArchiveError, match=rf"^{bomb}: member luad/zeros\.bin expands from \d+ to 20000000 "
                                           r"bytes, more than 100 times; refused as a zip bomb"):
        prepare_dataset(LUAD, [bomb], tmp_path / "out", tmp_path / "lock.json")
    assert [p.name for p in tmp_path.iterdir()] == ["bomb.zip"]


def test_archives_larger_than_the_limit_are_refused_before_extraction(canonical, tmp_path, monkeypatch):
    archive = zip_folder(canonical, tmp_path / "luad.zip")
    monkeypatch.setattr(acquire, "MAX_EXTRACTED_BYTES", 1000)
    with pytest.raises(ArchiveError, match=rf"^{archive}: \d+ bytes to extract, more than the limit \(1000 "
                                           r"bytes\); nothing extracted"):
        prepare_dataset(LUAD, [archive], tmp_path / "out", tmp_path / "lock.json")
    assert [p.name for p in tmp_path.iterdir()] == ["luad.zip"]


def test_checksum_lock_is_written_only_from_a_complete_set_of_parts(canonical, tmp_path, caplog):
    published = dataclasses.replace(LUAD, counts={"training": 6, "val": 3, "test": 3})
    files = _files(canonical)
    name = Path(max(n for n in files if n.startswith("test/img/"))).name
    last_test = [f"test/img/{name}", f"test/mask/{name}"]  # the part a browser's split download may lack
    first = _zip(tmp_path / "part-1.zip", canonical, [name for name in files if name not in last_test])
    second = _zip(tmp_path / "part-2.zip", canonical, last_test)
    lock = tmp_path / "lock.json"
    with caplog.at_level(logging.WARNING, "pathmamba.data"):
        manifest = prepare_dataset(published, [first], tmp_path / "incomplete", lock)
    assert manifest["counts"] == {"training": 6, "val": 3, "test": 2}
    assert not lock.exists()
    assert f"the checksum lock {lock} is not written" in caplog.text
    # The complete set is then accepted and locked, not refused against the incomplete one.
    assert prepare_dataset(published, [first, second], tmp_path / "complete", lock)["counts"]["test"] == 3
    assert set(json.loads(lock.read_text())["sha256"]) == {"part-1.zip", "part-2.zip"}
    with pytest.raises(ChecksumMismatch, match=r"part-2\.zip: in the lock but not among the sources"):
        prepare_dataset(published, [first], tmp_path / "again", lock)




ERROR_PAGE = b"<!DOCTYPE html><html><body>Quota exceeded</body></html>"


def test_an_error_page_saved_as_the_archive_is_removed_and_fetched_again(server, canonical, tmp_path, caplog):
    dest = tmp_path / "LUAD-HistoSeg.zip"
    dest.write_bytes(ERROR_PAGE)  # what an earlier run saved
    archive = zip_folder(canonical, tmp_path / "served.zip").read_bytes()
    server.files["LUAD-HistoSeg.zip"] = archive
    with caplog.at_level(logging.WARNING, "pathmamba.core.download"):
        assert download_file(server.url("LUAD-HistoSeg.zip"), dest, check=acquire.not_a_zip, retries=0,
                             timeout=10) == dest
    assert dest.read_bytes() == archive
    assert f"{dest}: not a zip archive: {len(ERROR_PAGE)} bytes starting b'<!DOCTYPE html>" in caplog.text
    assert "removed, downloading it again" in caplog.text


def test_a_server_sending_an_error_page_for_the_archive_fails_naming_the_url(server, tmp_path):
    server.files["LUAD-HistoSeg.zip"] = ERROR_PAGE
    dest, url = tmp_path / "LUAD-HistoSeg.zip", server.url("LUAD-HistoSeg.zip")
    with pytest.raises(DownloadFailed, match=rf"^{url}: the server sent another file than the one asked for "
                                             r"\(not a zip archive: .* starting b'<!DOCTYPE html>"):
        download_file(url, dest, check=acquire.not_a_zip, retries=0, timeout=10)
    assert not dest.exists()  # the next run downloads it again instead of taking it as done


# --- the command line (item 6) --------------------------------------------------------------------------

TINY_CAM = {"backbone": "resnet18", "width": 8, "pretrained": "none"}


@pytest.fixture(scope="module")
def bcss(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adversarial") / "bcss"
    make_synthetic_dataset("synthetic-bcss", root, n_train=6, n_val=3, n_test=3, size=SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def luad_model(tmp_path_factory) -> Path:
    """An untrained synthetic-luad model file: the refusals come before any prediction is scored."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model = build_method("cam", num_classes=NUM_CLASSES, **TINY_CAM)
    torch.save({"method": "cam", "dataset": "synthetic-luad", "seed": 0, "hparams": TINY_CAM,
                "state_dict": model.state_dict()}, path)
    return path


def _tables(experiment_dir: Path, out_dir: Path, seeds: list[str]) -> list[str]:
    return ["tables", "--experiment-dir", str(experiment_dir), "--datasets", "synthetic-luad", "--methods", "cam", "--seeds",
            *seeds, "--out-dir", str(out_dir)]


def test_tables_refuse_a_seed_given_twice(tmp_path, capsys):
    message = cli_error(_tables(tmp_path, tmp_path / "tables", ["0", "0", "0"]), capsys)
    assert message == "pathmamba tables: --seeds: 0 given more than once; each must be unique"
    assert not (tmp_path / "tables").exists()


def test_tables_refuse_a_experiment_folder_that_does_not_exist(tmp_path, capsys):
    message = cli_error(_tables(tmp_path / "typo", tmp_path / "tables", ["0"]), capsys)
    assert message == (f"pathmamba tables: --experiment-dir: {tmp_path / 'typo'} is not a folder; expected results/<experiment> "
                       "holding runs/")
    assert not (tmp_path / "tables").exists()
    # Given beside a config, the mistyped --experiment-dir is still what the message names.
    config = tmp_path / "config.yaml"
    config.write_text("experiment: r\nseeds: [0]\ndatasets: {synthetic-luad: {root: x}}\nmethods: {cam: {}}\n")
    message = cli_error([*_tables(tmp_path / "typo", tmp_path / "tables", ["0"]), "--configfile", str(config)],
                        capsys)
    assert message.startswith(f"pathmamba tables: --experiment-dir: {tmp_path / 'typo'} is not a folder")


def test_a_missing_config_file_is_one_line_naming_it(tmp_path, capsys):
    message = cli_error(["tables", "--configfile", str(tmp_path / "nosuch.yaml"), "--out-dir", str(tmp_path)], capsys)
    assert message == f"pathmamba tables: [Errno 2] No such file or directory: '{tmp_path / 'nosuch.yaml'}'"


def test_debug_keeps_the_traceback_of_an_expected_error(tmp_path):
    with pytest.raises(InputError, match="--seeds: 0 given more than once"):
        cli_main(["--debug", *_tables(tmp_path, tmp_path / "tables", ["0", "0"])])


def test_training_on_another_datasets_files_is_refused_naming_a_file(canonical, tmp_path, capsys):
    message = cli_error(["train", "--method", "cam", "--dataset", "synthetic-bcss", "--data-root", str(canonical),
                         "--out", str(tmp_path / "run"), "--checkpoint-dir", str(tmp_path / "checkpoints"),
                         "--hparams", json.dumps(TINY_CAM), "--settings", json.dumps({"device": "cpu"})], capsys)
    first = min((canonical / "training").glob("*.png"))
    assert message == (f"pathmamba train: {first}: label not written as synthetic-bcss writes it, like "
                       "'...+0[1001].png'; is this file from another dataset?")
    assert not (tmp_path / "run").exists() and not (tmp_path / "checkpoints").exists()


def test_evaluating_a_model_on_another_datasets_files_is_refused(luad_model, bcss, tmp_path, capsys):
    message = cli_error(["evaluate", "--model", str(luad_model), "--data-root", str(bcss), "--out",
                         str(tmp_path / "eval"), "--device", "cpu"], capsys)
    first = min((bcss / "training").glob("*.png"))
    assert message == (f"pathmamba evaluate: {first}: label not written as synthetic-luad writes it, like "
                       "'...-[1 0 0 1].png'; is this file from another dataset?")
    assert not (tmp_path / "eval").exists()


def test_masks_of_another_dataset_are_refused_even_under_the_right_names(luad_model, canonical, bcss, tmp_path,
                                                                         capsys):
    # BCSS masks beside LUAD training files: the names pass, the masks' colours are not LUAD's.
    data = Path(shutil.copytree(bcss, tmp_path / "data"))
    shutil.rmtree(data / "training")
    shutil.copytree(canonical / "training", data / "training")
    message = cli_error(["evaluate", "--model", str(luad_model), "--data-root", str(data), "--out",
                         str(tmp_path / "eval"), "--device", "cpu"], capsys)
    assert re.fullmatch(rf"pathmamba evaluate: {data}/test/mask/\S+\.png: mask value \d at row \d+, column \d+ has "
                        r"the colour \(\d+, \d+, \d+\), not in the synthetic-luad palette; .*", message)
    assert not (tmp_path / "eval" / "test_metrics.json").exists()


# --- data changed after its validation (item 2) -----------------------------------------------------------


@pytest.fixture
def validated(luad, tmp_path, capsys) -> Path:
    """The validation report of ``luad``, written by the CLI as the workflow's rule does."""
    report = tmp_path / "validation.json"
    assert cli_main(["validate-dataset", "--dataset", "synthetic-luad", "--data-root", str(luad), "--out",
                     str(report), "--image-size", str(SIZE)]) == 0
    return report


def _train_argv(luad: Path, report: Path, tmp_path: Path) -> list[str]:
    return ["train", "--method", "cam", "--dataset", "synthetic-luad", "--data-root", str(luad), "--validated",
            str(report), "--out", str(tmp_path / "run"), "--checkpoint-dir", str(tmp_path / "checkpoints")]


def test_unchanged_data_passes_the_validation_check(luad, validated):
    check_validated(validated, luad)
    assert json.loads(validated.read_text())["fingerprint"] == dataset_fingerprint(
        luad, [path for path in luad.rglob("*.png")])


def test_a_test_image_removed_after_validation_is_refused(luad, validated, tmp_path, capsys):
    name = min((luad / "test" / "img").glob("*.png")).name
    (luad / "test" / "img" / name).unlink()
    (luad / "test" / "mask" / name).unlink()
    message = cli_error(_train_argv(luad, validated, tmp_path), capsys)
    assert message == (f"pathmamba train: {luad}: files added, removed or changed since its validation "
                       f"({validated}: {{'training': 6, 'val': 3, 'test': 3}}, now {{'training': 6, 'val': 3, "
                       f"'test': 2}}); delete {validated} to validate it again (the workflow then reruns every "
                       "job that used it)")
    assert not (tmp_path / "run").exists()


def test_a_mask_edited_after_validation_is_refused(luad, validated, luad_model, tmp_path, capsys):
    mask = min((luad / "test" / "mask").glob("*.png"))
    image = Image.open(mask)
    image.putpixel((0, 0), (image.getpixel((0, 0)) + 1) % 5)  # the same files, one pixel of another class
    image.save(mask)
    message = cli_error(["evaluate", "--model", str(luad_model), "--data-root", str(luad), "--validated",
                         str(validated), "--out", str(tmp_path / "eval"), "--device", "cpu"], capsys)
    assert message.startswith(f"pathmamba evaluate: {luad}: files added, removed or changed since its validation")
    assert not (tmp_path / "eval").exists()


def test_a_damaged_validation_report_is_refused_naming_it(luad, validated, tmp_path, capsys):
    validated.write_text(validated.read_text()[:40])
    message = cli_error(_train_argv(luad, validated, tmp_path), capsys)
    assert message.startswith(f"pathmamba train: {validated}: not a validation report of this version (")
    assert message.endswith("; delete it to validate the dataset again")


@pytest.mark.parametrize(("settings", "named"), [('{"epochs": "x"}', "epochs='x' is not of type int"),
                                                 ('{"lr": "1e-3"}', "lr='1e-3' is not of type float"),
                                                 ('{"augment": 1}', "augment=1 is not of type bool"),
                                                 ('{"epoch": 3}', "valid keys: epochs")])
def test_train_settings_of_the_wrong_type_or_name_are_refused_before_training(luad, tmp_path, capsys, settings,
                                                                               named):
    out = tmp_path / "run"
    message = cli_error(["train", "--method", "cam", "--dataset", "synthetic-luad", "--data-root", str(luad),
                         "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"), "--settings", settings],
                        capsys)
    assert message.startswith("pathmamba train: --settings: ") and named in message
    assert not out.exists() and not (tmp_path / "ck").exists()
