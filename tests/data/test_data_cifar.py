import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from effsam.data import cifar, load_dataset
from effsam.data.loader import (
    ChecksumError,
    CorruptDatasetError,
    DatasetError,
    DatasetNotFoundError,
)

PER_BATCH = 3  # images per file: the format is official, the size is tiny


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar_folder(parent: Path, name: str = "cifar10", seed: int = 0) -> dict:
    """Writes the official python-version files with tiny batches; returns the images as HWC."""
    rng = np.random.default_rng(seed)
    spec = cifar.SPECS[name]
    folder = parent / spec.folder
    folder.mkdir(parents=True)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    expected = {}
    for filename in (*spec.train_files, spec.test_file):
        hwc = rng.integers(0, 256, (PER_BATCH, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, spec.num_classes, PER_BATCH).tolist()
        # Official row layout: the 1024 red values row by row, then green, then blue.
        rows = np.stack([np.concatenate([im[:, :, ch].ravel() for ch in range(3)]) for im in hwc])
        batch = {b"batch_label": filename.encode(), label_key: labels, b"data": rows}
        batch[b"filenames"] = [f"img_{i}.png".encode() for i in range(PER_BATCH)]
        if name == "cifar100":
            batch[b"coarse_labels"] = [lab // 5 for lab in labels]
        _write_pickle(folder / filename, batch)
        expected[filename] = (hwc, labels)
    names = [f"class_{i}".encode() for i in range(spec.num_classes)]
    meta = {b"label_names": names, b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072}
    if name == "cifar100":
        meta = {b"fine_label_names": names, b"coarse_label_names": names[:20]}
    _write_pickle(folder / spec.meta_file, meta)
    return expected


def make_cifar_tarball(directory: Path, name: str = "cifar10", seed: int = 0) -> tuple:
    staging = directory / "_staging"
    expected = make_cifar_folder(staging, name, seed)
    spec = cifar.SPECS[name]
    tarball = directory / spec.tarball
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(staging / spec.folder, arcname=spec.folder)
    for file in sorted((staging / spec.folder).iterdir()):
        file.unlink()
    (staging / spec.folder).rmdir()
    staging.rmdir()
    return tarball, expected


def _check_content(data, expected, spec):
    train_hwc = np.concatenate([expected[f][0] for f in spec.train_files])
    train_labels = sum((expected[f][1] for f in spec.train_files), [])
    assert data.train_x.dtype == torch.uint8
    assert data.train_x.shape == (PER_BATCH * len(spec.train_files), 3, 32, 32)
    assert torch.equal(data.train_x, torch.from_numpy(train_hwc).permute(0, 3, 1, 2))
    assert data.train_y.tolist() == train_labels
    test_hwc, test_labels = expected[spec.test_file]
    assert torch.equal(data.test_x, torch.from_numpy(test_hwc).permute(0, 3, 1, 2))
    assert data.test_y.dtype == torch.int64 and data.test_y.tolist() == test_labels
    assert data.num_classes == spec.num_classes and data.augment == "cifar"
    assert data.classes[1] == "class_1"


def test_reads_tarball_in_official_layout(tmp_path):
    _, expected = make_cifar_tarball(tmp_path)
    data = load_dataset("cifar10", data_dir=tmp_path, allow_unverified=True)
    _check_content(data, expected, cifar.SPECS["cifar10"])
    assert data.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert data.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))


def test_reads_extracted_folder_and_cifar100(tmp_path):
    expected = make_cifar_folder(tmp_path / "cifar100", "cifar100")  # data_dir/<name>/ is searched
    data = load_dataset("cifar100", data_dir=tmp_path, allow_unverified=True)
    _check_content(data, expected, cifar.SPECS["cifar100"])


def test_known_checksums_are_listed():
    assert cifar.OFFICIAL_TARBALL_MD5["cifar10"] == "c58f30108f718f92721af3b95e74349a"
    assert cifar.OFFICIAL_TARBALL_MD5["cifar100"] == "eb9058c3a382ffc7106e4002c42a8d85"
    assert cifar.KNOWN_REBUILT_MD5["a79d3d0b8127758f7b3112656de674d1"] == "cifar10"


def test_unknown_tarball_checksum_is_refused_with_advice(tmp_path):
    tarball, _ = make_cifar_tarball(tmp_path)
    with pytest.raises(ChecksumError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    for part in (
        str(tarball),
        _md5(tarball),
        "c58f30108f718f92721af3b95e74349a",
        "a79d3d0b8127758f7b3112656de674d1",
        "allow_unverified=True",
        "--allow-unverified",
    ):
        assert part in message


def test_known_rebuilt_tarball_is_accepted(tmp_path, monkeypatch):
    tarball, _ = make_cifar_tarball(tmp_path)
    monkeypatch.setitem(cifar.KNOWN_REBUILT_MD5, _md5(tarball), "cifar10")
    assert load_dataset("cifar10", data_dir=tmp_path).train_x.shape[0] == 5 * PER_BATCH
    with pytest.raises(ChecksumError):  # registered for CIFAR-10 only
        cifar.verify_cifar("cifar100", tarball)


def test_folder_is_checked_file_by_file(tmp_path, monkeypatch):
    make_cifar_folder(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    sums = {f.name: _md5(f) for f in folder.iterdir()}
    monkeypatch.setitem(cifar.OFFICIAL_FILE_MD5, "cifar10", sums)
    assert load_dataset("cifar10", data_dir=tmp_path).test_x.shape[0] == PER_BATCH
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes() + b"\0")
    with pytest.raises(ChecksumError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(batch) in str(info.value) and _md5(batch) in str(info.value)
    assert sums["data_batch_3"] in str(info.value) and "--allow-unverified" in str(info.value)
    assert load_dataset("cifar10", data_dir=tmp_path, allow_unverified=True).train_x.shape[0] == 15


def test_folder_mixing_two_copies_is_refused(tmp_path, monkeypatch):
    make_cifar_folder(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    sums = {f.name: _md5(f) for f in folder.iterdir()}
    # Each file matches one of the two lists, but no list matches every file.
    monkeypatch.setitem(cifar.OFFICIAL_FILE_MD5, "cifar10", {**sums, "data_batch_1": "0" * 32})
    monkeypatch.setitem(
        cifar.KNOWN_REBUILT_FILE_MD5, "cifar10", ({**sums, "data_batch_2": "1" * 32},)
    )
    with pytest.raises(ChecksumError, match="different copies"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFSAM_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-python.tar.gz") in message
    assert str(tmp_path / "nowhere" / "cifar10" / "cifar-10-batches-py") in message
    for part in (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "--download",
        "--data-dir",
        "EFFSAM_DATA_DIR",
    ):
        assert part in message
    assert isinstance(info.value, FileNotFoundError)


def test_data_dir_from_environment_then_cwd(tmp_path, monkeypatch):
    make_cifar_tarball(tmp_path)
    monkeypatch.setenv("EFFSAM_DATA_DIR", str(tmp_path))
    assert load_dataset("cifar10", allow_unverified=True).num_classes == 10
    monkeypatch.delenv("EFFSAM_DATA_DIR")
    work = tmp_path / "work"
    make_cifar_folder(work / "data")
    monkeypatch.chdir(work)
    assert load_dataset("cifar10", allow_unverified=True).num_classes == 10


def test_truncated_tarball_is_reported_by_name(tmp_path):
    tarball, _ = make_cifar_tarball(tmp_path)
    raw = tarball.read_bytes()
    tarball.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptDatasetError) as info:
        load_dataset("cifar10", data_dir=tmp_path, allow_unverified=True)
    assert str(tarball) in str(info.value)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"not a pickle at all", "data_batch_2"),
        (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}), "3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "data_batch_2"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "labels"),
        (pickle.dumps([1, 2, 3]), "dict"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": 4}), "1 images"),
    ],
    ids=["garbage", "columns", "label-count", "label-range", "not-a-dict", "scalar-labels"],
)
def test_bad_batch_files_are_reported_by_name(tmp_path, content, fragment):
    make_cifar_folder(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    target.write_bytes(content)
    with pytest.raises(CorruptDatasetError) as info:
        load_dataset("cifar10", data_dir=tmp_path, allow_unverified=True)
    assert fragment in str(info.value) and "data_batch_2" in str(info.value)


class _Boom:
    def __reduce__(self):
        return (os.remove, ("should-never-run",))


def test_pickles_cannot_run_code(tmp_path):
    make_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Boom()}))
    with pytest.raises(CorruptDatasetError, match="posix.remove|os.remove|nt.remove"):
        load_dataset("cifar10", data_dir=tmp_path, allow_unverified=True)


@pytest.fixture()
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_download_fetches_verifies_and_loads(http_dir, tmp_path, monkeypatch):
    served, base = http_dir
    tarball, expected = make_cifar_tarball(served)
    target_dir = tmp_path / "target"
    path = cifar.download_cifar(
        "cifar10", target_dir, url=f"{base}/{tarball.name}", md5=_md5(tarball)
    )
    assert path == target_dir / "cifar-10-python.tar.gz"
    assert path.read_bytes() == tarball.read_bytes()
    assert sorted(p.name for p in target_dir.iterdir()) == [path.name]
    # Through load_dataset: the module-level URL and the accepted sums are the knobs.
    other_dir = tmp_path / "other"
    monkeypatch.setitem(cifar.CIFAR_URLS, "cifar10", f"{base}/{tarball.name}")
    monkeypatch.setitem(cifar.KNOWN_REBUILT_MD5, _md5(tarball), "cifar10")
    data = load_dataset("cifar10", data_dir=other_dir, download=True)
    _check_content(data, expected, cifar.SPECS["cifar10"])
    assert (other_dir / "cifar-10-python.tar.gz").is_file()


def test_download_with_wrong_checksum_leaves_nothing(http_dir, tmp_path):
    served, base = http_dir
    tarball, _ = make_cifar_tarball(served)
    target_dir = tmp_path / "target"
    with pytest.raises(ChecksumError) as info:
        cifar.download_cifar("cifar10", target_dir, url=f"{base}/{tarball.name}")
    assert _md5(tarball) in str(info.value)
    assert "c58f30108f718f92721af3b95e74349a" in str(info.value)
    assert list(target_dir.iterdir()) == []


def test_download_failure_is_a_clear_error(http_dir, tmp_path):
    _, base = http_dir
    target_dir = tmp_path / "target"
    with pytest.raises(DatasetError) as info:
        cifar.download_cifar("cifar100", target_dir, url=f"{base}/missing.tar.gz")
    assert "missing.tar.gz" in str(info.value) and "404" in str(info.value)
    assert list(target_dir.iterdir()) == []


def test_tarball_with_leading_dot_slash_members(tmp_path):
    staging = tmp_path / "s"
    expected = make_cifar_folder(staging)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.add(staging / "cifar-10-batches-py", arcname="./cifar-10-batches-py")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    data = load_dataset("cifar10", data_dir=tmp_path / "d", allow_unverified=True)
    _check_content(data, expected, cifar.SPECS["cifar10"])
