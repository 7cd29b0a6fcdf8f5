"""Acquisition: archives and folders in the published layout's variants, downloads over loopback HTTP
(interrupted, resumed, restarted), the checksum lock."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from PIL import Image

from pathmamba.core.download import DownloadFailed, download_file, partial_files
from pathmamba.core.files import file_sha256
from pathmamba.data.acquire import ChecksumMismatch, download_dataset, prepare_dataset
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import published_copy, zip_folder
from pathmamba.data.validate import validate_dataset
from pathmamba.engine.config import ConfigError, check_config

SPEC = get_dataset_spec("synthetic-luad")
SIZE = 32
# gdown writes in 512 KiB chunks and drops a chunk cut short: 3 MB cut after 1.5 MB keeps 1 MiB.
TRANSFER_BYTES = 3_000_000
CUT_AFTER = 1_500_000


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def make_variant(canonical: Path, where: Path) -> Path:
    """The canonical dataset as seen in the wild: nested top folder, train/ for training/, RGB masks and
    one test image without a mask. Returns the outer folder."""
    return published_copy(canonical, where / "LUAD-HistoSeg", SPEC, train_folder="train")


def assert_canonical(out: Path, canonical: Path) -> dict:
    """``out`` holds exactly the canonical files, pixel for pixel, masks in P mode; returns the manifest."""
    assert _files(out) == sorted([*_files(canonical), "manifest.json"])
    for relative in _files(canonical):
        expected, found = Image.open(canonical / relative), Image.open(out / relative)
        assert found.mode == expected.mode, relative
        assert np.array_equal(np.asarray(found), np.asarray(expected)), relative
    assert validate_dataset(out, SPEC, image_size=SIZE).ok
    return json.loads((out / "manifest.json").read_text())


def test_archive_of_a_variant_becomes_the_canonical_layout(canonical, tmp_path):
    archive = zip_folder(make_variant(canonical, tmp_path / "wild"), tmp_path / "LUAD-HistoSeg.zip")
    out, lock = tmp_path / "datasets" / "synthetic-luad", tmp_path / "checksums" / "synthetic-luad.json"
    manifest = prepare_dataset(SPEC, [archive], out, lock)

    assert assert_canonical(out, canonical) == manifest
    assert manifest["counts"] == {"training": 6, "val": 3, "test": 3}
    assert manifest["sha256"] == {"LUAD-HistoSeg.zip": file_sha256(archive)}
    assert sum(manifest["label_frequency"].values()) >= 6
    assert sum(manifest["pixel_frequency"]["test"].values()) == pytest.approx(1.0, abs=1e-5)
    notes = "\n".join(manifest["tolerated"])
    for expected in ("nested top folder", "train/ instead of training/", "unpaired.png has no mask",
                     "val: 3 of 3 masks are RGB"):
        assert expected in notes
    assert json.loads(lock.read_text()) == {"dataset": "synthetic-luad", "sha256": manifest["sha256"]}
    assert archive.exists() and not list(out.parent.glob(".*"))  # sources kept, no leftovers


def test_split_archives_and_an_extracted_folder_give_the_same_dataset(canonical, tmp_path):
    wild = make_variant(canonical, tmp_path / "wild")
    parts = [zip_folder(wild, tmp_path / "part-001.zip", "train/*"),
             zip_folder(wild, tmp_path / "part-002.zip", "[vt][ae][ls]*/**/*")]
    prepare_dataset(SPEC, parts, tmp_path / "from-parts", tmp_path / "a.json")
    assert_canonical(tmp_path / "from-parts", canonical)

    before = _files(wild)
    prepare_dataset(SPEC, [wild], tmp_path / "from-folder", tmp_path / "b.json")
    assert_canonical(tmp_path / "from-folder", canonical)
    assert _files(wild) == before  # a user's folder is linked or copied from, never moved


def test_checksum_mismatch_stops_and_removes_nothing(canonical, tmp_path):
    archive = zip_folder(canonical, tmp_path / "LUAD-HistoSeg.zip")
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"dataset": "synthetic-luad", "sha256": {"LUAD-HistoSeg.zip": "0" * 64}}))
    locked, archived = lock.read_bytes(), archive.read_bytes()
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatch) as error:
        prepare_dataset(SPEC, [archive], out, lock)
    assert f"LUAD-HistoSeg.zip: sha256 {file_sha256(archive)}, the lock has {'0' * 64}" in str(error.value)
    assert f"delete {lock} to accept" in str(error.value)
    assert lock.read_bytes() == locked and archive.read_bytes() == archived and not out.exists()


# --- downloads over loopback HTTP (conftest's `server`) ------------------------------------------------


def test_interrupted_download_is_never_used_and_resumes(server, tmp_path):
    data = np.random.default_rng(0).bytes(TRANSFER_BYTES)
    server.files["data.bin"] = data
    dest = tmp_path / "downloads" / "data.bin"

    server.cut_next_after = CUT_AFTER
    with pytest.raises(DownloadFailed, match="partial file kept for the next attempt to resume"):
        download_file(server.url("data.bin"), dest, retries=0, timeout=10)
    assert not dest.exists()
    [part] = partial_files(dest)
    kept = part.stat().st_size
    assert 0 < kept <= CUT_AFTER

    assert download_file(server.url("data.bin"), dest, retries=0, timeout=10) == dest
    # gdown opens the file once without a range, then asks for the missing bytes.
    assert server.ranges == [None, None, f"bytes={kept}-"]
    assert dest.read_bytes() == data and not partial_files(dest)


def test_download_restarts_when_the_server_cannot_resume(server, tmp_path):
    data = np.random.default_rng(1).bytes(TRANSFER_BYTES)
    server.files["data.bin"] = data
    server.honour_range = False
    dest = tmp_path / "data.bin"
    server.cut_next_after = CUT_AFTER
    with pytest.raises(DownloadFailed):
        download_file(server.url("data.bin"), dest, retries=0, timeout=10)
    [part] = partial_files(dest)
    kept = part.stat().st_size

    assert download_file(server.url("data.bin"), dest, retries=0, timeout=10) == dest
    assert server.ranges == [None, None, f"bytes={kept}-", None]  # refused resume, then a fresh transfer
    assert dest.read_bytes() == data and not partial_files(dest)


def test_downloaded_archive_is_prepared_then_locked(server, canonical, tmp_path, caplog):
    server.files["LUAD-HistoSeg.zip"] = zip_folder(canonical, tmp_path / "served.zip").read_bytes()
    folder, lock = tmp_path / "downloads", tmp_path / "lock.json"
    caplog.set_level(logging.INFO, logger="pathmamba")
    [downloaded] = download_dataset(SPEC, folder, server.url("LUAD-HistoSeg.zip"))
    assert downloaded == folder / "LUAD-HistoSeg.zip"
    prepare_dataset(SPEC, [downloaded], tmp_path / "first", lock)
    assert_canonical(tmp_path / "first", canonical)
    # Progress reaches the log (the job's log file), not only a terminal.
    size_mb = downloaded.stat().st_size / 1e6
    assert f"downloaded LUAD-HistoSeg.zip: {size_mb:.1f} MB, " in caplog.text
    first = tmp_path / "first"
    n_items = sum(len(list((first / folder).glob("*.png"))) for folder in ("training", "val/img", "test/img"))
    assert f"{SPEC.name}: files laid out {n_items}/{n_items} (100%)" in caplog.text

    # The file changes on the server: a new download no longer matches the lock.
    downloaded.unlink()
    server.files["LUAD-HistoSeg.zip"] += b"\0"
    download_dataset(SPEC, folder, server.url("LUAD-HistoSeg.zip"))
    with pytest.raises(ChecksumMismatch, match=r"LUAD-HistoSeg\.zip: sha256"):
        prepare_dataset(SPEC, [downloaded], tmp_path / "second", lock)
    assert downloaded.exists() and not (tmp_path / "second").exists()


# --- the workflow's rules -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_workflow_prepares_and_validates_archives_before_training(canonical, tmp_path, snakemake_bin,
                                                                   workflow_env):
    good = zip_folder(make_variant(canonical, tmp_path / "wild"), tmp_path / "good.zip")
    bad_root = Path(shutil.copytree(canonical, tmp_path / "bad" / "LUAD-HistoSeg"))
    bad_mask = min((bad_root / "val" / "mask").glob("*.png"))
    Image.fromarray(np.full((SIZE, SIZE), 7, dtype=np.uint8)).save(bad_mask)
    bad = zip_folder(bad_root, tmp_path / "bad.zip")
    config = {
        "experiment": "tiny", "seeds": [0],
        "datasets": {"synthetic-luad": {"archive": str(good), "validate": {"image_size": SIZE}},
                     "synthetic-bcss": {"archive": [str(bad)], "validate": {"image_size": SIZE}}},
        "train": {"epochs": 1}, "methods": {"cam": {}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    reports = [f"results/tiny/datasets/{name}/validation.json" for name in config["datasets"]]
    result = subprocess.run(
        [snakemake_bin, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "--keep-going", *reports],
        capture_output=True, text=True, env=workflow_env, timeout=300, check=False,
    )
    assert result.returncode != 0
    assert json.loads((tmp_path / reports[0]).read_text())["ok"]
    assert json.loads((tmp_path / "resources/datasets/synthetic-luad/manifest.json").read_text())["counts"] == {
        "training": 6, "val": 3, "test": 3}
    assert (tmp_path / "resources/checksums/synthetic-luad.json").exists()
    assert not (tmp_path / reports[1]).exists()
    log = (tmp_path / "results/tiny/logs/data/synthetic-bcss.validate.log").read_text()
    prepared_mask = f"resources/datasets/synthetic-bcss/val/mask/{bad_mask.name}"
    assert "validate-dataset: synthetic-bcss: INVALID" in log and f"{prepared_mask}: mask value 7" in log
    assert "Traceback" not in log


def test_config_check_names_bad_dataset_sources(tmp_path):
    archive = zip_folder(tmp_path, tmp_path.parent / f"{tmp_path.name}.zip")
    check_config({"datasets": {"luad-histoseg": {"archive": [str(archive)]}, "bcss-wsss": {"source": "gdrive"}}})
    with pytest.raises(ConfigError) as error:
        check_config({"datasets": {"synthetic-luad": {"source": "gdrive"},
                                   "luad-histoseg": {"archive": ["/no/such/part-001.zip"]}}})
    assert "datasets.synthetic-luad.source: synthetic-luad has no published Google Drive folder" in str(error.value)
    assert "datasets.luad-histoseg.archive: '/no/such/part-001.zip' is not a file" in str(error.value)
