"""CIFAR-10 and CIFAR-100 from the official "python version" files, with checksums.

Where the data is looked for: the ``data_dir`` argument, else the environment variable
``EFFSAM_DATA_DIR``, else ``./data``. In that directory (and in its subdirectory named after the
data set, e.g. ``data/cifar10/``) the loader takes the first of: the tarball
(``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read in place, no extraction) or the
extracted folder (``cifar-10-batches-py/`` / ``cifar-100-python/``). ``data_dir`` may also name the
tarball or the folder itself.

Checks: a tarball's md5 must be the official one or that of a known rebuilt copy
(:data:`KNOWN_REBUILT_MD5`); in an extracted folder every file's md5 must match the official
per-file list (the one torchvision publishes) or the per-file list of a known rebuilt copy, all
files from the same copy. ``allow_unverified=True`` skips the checks; reading still validates
shapes and labels.

The pickles are read with an unpickler that only accepts the numpy array types the format needs,
so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from effsam.data.loader import (
    ChecksumError,
    CorruptDatasetError,
    DatasetError,
    DatasetNotFoundError,
    ImageData,
)

log = logging.getLogger(__name__)

#: Where ``download=True`` fetches each archive from; tests point this at a local server.
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
OFFICIAL_TARBALL_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}
#: Tarballs that are not the official file but hold the same data, md5 -> data set name.
KNOWN_REBUILT_MD5 = {
    # CIFAR-10 rebuilt from a lossless image copy: pixel-exact, images in a different order.
    "a79d3d0b8127758f7b3112656de674d1": "cifar10",
}
OFFICIAL_FILE_MD5 = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}
#: Per-file md5 lists of the rebuilt copies in :data:`KNOWN_REBUILT_MD5`, once extracted.
KNOWN_REBUILT_FILE_MD5: dict[str, tuple[dict[str, str], ...]] = {
    "cifar10": (
        {
            "data_batch_1": "5ba31d4fb62f6866550de5b5a59053e0",
            "data_batch_2": "83703f2094dbbac5dd6421d29ddfda3d",
            "data_batch_3": "e74c4098edfe553114db9ebb67db7ab1",
            "data_batch_4": "58cba19334fb26e2f35d1a27dd340020",
            "data_batch_5": "85b2002452901c2ef3c0e89a652c6a10",
            "test_batch": "429bef5b4d391dcfa3b9589200ef7fce",
            "batches.meta": "45d26475d9b034b7ccf933c8d9f1974c",
        },
    ),
    "cifar100": (),
}
#: Per-channel statistics used by the SAM/ESAM papers, scaled to images in [0, 1].
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
ENV_DATA_DIR = "EFFSAM_DATA_DIR"


@dataclass(frozen=True)
class CifarSpec:
    """File layout of one CIFAR variant."""

    title: str
    tarball: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


SPECS = {
    "cifar10": CifarSpec(
        "CIFAR-10",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": CifarSpec(
        "CIFAR-100",
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        ("train",),
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
    ),
}


def _spec(name: str) -> CifarSpec:
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose from {tuple(SPECS)}")
    return SPECS[name]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$EFFSAM_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        path = Path(data_dir)
    else:
        env = os.environ.get(ENV_DATA_DIR)
        path = Path(env) if env else Path("data")
    # Absolute, so error messages say where "./data" was for the process.
    return path.expanduser().absolute()


def candidate_paths(name: str, root: Path) -> list[Path]:
    """Places searched for a CIFAR variant under ``root``, in order of preference."""
    spec = _spec(name)
    places = [root, root / name]
    found = [p / entry for p in places for entry in (spec.tarball, spec.folder)]
    if root.name in (spec.tarball, spec.folder):
        found.insert(0, root)
    return found


def find_cifar(name: str, root: Path) -> Path | None:
    """First existing tarball or extracted folder of ``name`` under ``root``, or None."""
    spec = _spec(name)
    for path in candidate_paths(name, root):
        if path.name == spec.tarball and path.is_file():
            return path
        if path.name == spec.folder and path.is_dir():
            return path
    return None


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_SKIP_HINT = "pass allow_unverified=True (CLI flag --allow-unverified) to skip the check"


def verify_cifar(name: str, path: Path) -> None:
    """Checks a tarball or extracted folder against the accepted md5 sums.

    Raises:
        ChecksumError: If a file matches none of the accepted sums.
        DatasetNotFoundError: If an extracted folder lacks one of the files.
    """
    spec = _spec(name)
    if path.is_file():
        found = md5sum(path)
        rebuilt = [m for m, owner in KNOWN_REBUILT_MD5.items() if owner == name]
        if found != OFFICIAL_TARBALL_MD5[name] and found not in rebuilt:
            raise ChecksumError(
                f"{spec.title} archive {path} has md5 {found}, expected the official "
                f"{OFFICIAL_TARBALL_MD5[name]} or a known rebuilt copy {rebuilt}. The file may "
                f"be truncated or altered: delete it and download it again, or {_SKIP_HINT}."
            )
        return
    copies = (OFFICIAL_FILE_MD5[name], *KNOWN_REBUILT_FILE_MD5[name])
    consistent = set(range(len(copies)))
    for filename in spec.files:
        file_path = path / filename
        if not file_path.is_file():
            raise DatasetNotFoundError(f"{spec.title} folder {path} lacks the file {filename}")
        found = md5sum(file_path)
        matching = {i for i, copy in enumerate(copies) if copy[filename] == found}
        if not matching:
            expected = [copy[filename] for copy in copies]
            raise ChecksumError(
                f"{spec.title} file {file_path} has md5 {found}, expected one of {expected} "
                f"(official first). Replace the folder with a fresh copy, or {_SKIP_HINT}."
            )
        consistent &= matching
    if not consistent:
        raise ChecksumError(
            f"the files in {path} are individually known but come from different copies of "
            f"{spec.title} (whose image orders differ); use one copy, or {_SKIP_HINT}."
        )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a pickled numpy array needs."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            # Python 3 writes bytes this way under pickle protocols 0-2: harmless str -> bytes.
            return codecs.encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "_reconstruct",
            "scalar",
        ):
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray
            return getattr(multiarray, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")


def _unpickle(raw: bytes, where: str) -> dict[str, object]:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle signals bad input with many exception types
        raise CorruptDatasetError(f"{where} is not a readable CIFAR pickle: {exc!r}") from exc
    if not isinstance(obj, dict):
        raise CorruptDatasetError(f"{where} holds a {type(obj).__name__}, expected a dict")
    # Python 2 pickles give bytes keys under encoding="bytes"; newer ones may give str.
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _parse_batch(obj: dict[str, object], where: str, spec: CifarSpec) -> tuple[np.ndarray, ...]:
    data, labels = obj.get("data"), obj.get(spec.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CorruptDatasetError(f"{where}: 'data' must be a uint8 N x 3072 array, got {desc}")
    if data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(f"{where}: 'data' has {data.shape[1]} columns, expected 3072")
    if labels is None:
        raise CorruptDatasetError(f"{where}: no {spec.label_key!r} entry")
    y = np.asarray(labels)
    if y.shape != (data.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise CorruptDatasetError(
            f"{where}: {y.size} labels of type {y.dtype} for {data.shape[0]} images"
        )
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise CorruptDatasetError(f"{where}: labels outside 0..{spec.num_classes - 1}")
    return data, y.astype(np.int64)


def _reader(path: Path, spec: CifarSpec) -> Callable[[str], bytes | None]:
    """A function returning the bytes of one file of the data set, or None if it is absent."""
    if path.is_dir():

        def read_file(filename: str) -> bytes | None:
            target = path / filename
            return target.read_bytes() if target.is_file() else None

        return read_file
    # One forward pass over the archive: a gzip stream seeks backwards only by decompressing
    # again from the start, so reading members out of archive order would cost several passes.
    wanted = {f"{spec.folder}/{f}": f for f in spec.files}
    contents: dict[str, bytes] = {}
    name = str(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                filename = wanted.get(member.name.removeprefix("./"))
                if filename is not None and member.isfile():
                    name = f"{path}:{member.name}"
                    contents[filename] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CorruptDatasetError(
            f"cannot read {name}: {exc}. The archive looks truncated or damaged: delete it and "
            "download it again."
        ) from exc
    return contents.get


def read_cifar(name: str, path: Path) -> ImageData:
    """Reads a CIFAR tarball or extracted folder without checking checksums.

    Raises:
        CorruptDatasetError: If a file cannot be read or has the wrong content.
    """
    spec = _spec(name)
    read = _reader(path, spec)
    splits = []
    for files in (spec.train_files, (spec.test_file,)):
        xs, ys = [], []
        for filename in files:
            raw = read(filename)
            where = f"{path}:{filename}"
            if raw is None:
                raise CorruptDatasetError(f"{path} lacks {spec.folder}/{filename}")
            x, y = _parse_batch(_unpickle(raw, where), where, spec)
            xs.append(x)
            ys.append(y)
        # Rows are the R, G and B planes of 32x32 pixels in row-major order.
        x = np.concatenate(xs).reshape(-1, 3, 32, 32)
        splits.append((torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))))
    classes = tuple(str(c) for c in range(spec.num_classes))
    raw_meta = read(spec.meta_file)
    if raw_meta is not None:
        names = _unpickle(raw_meta, f"{path}:{spec.meta_file}").get(spec.names_key)
        if isinstance(names, list) and len(names) == spec.num_classes:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    (train_x, train_y), (test_x, test_y) = splits
    return ImageData(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=spec.num_classes,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        augment="cifar",
        classes=classes,
    )


def download_cifar(
    name: str,
    data_dir: str | os.PathLike | None = None,
    url: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Downloads the tarball of ``name`` into the data directory, verified.

    The bytes go to a hidden temporary file next to the target, which is renamed into place only
    after its md5 matched, so an interrupted or bad download never leaves a partial archive.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: Target directory (see :func:`resolve_data_dir`); created if needed.
        url: Source; defaults to ``CIFAR_URLS[name]``.
        md5: Required md5; defaults to the official md5 or that of a known rebuilt copy.
        timeout: Socket timeout in seconds.

    Returns:
        Path of the downloaded tarball.

    Raises:
        DatasetError: If the download fails.
        ChecksumError: If the downloaded file has an unexpected md5.
    """
    spec = _spec(name)
    root = resolve_data_dir(data_dir)
    url = url or CIFAR_URLS[name]
    if md5 is not None:
        accepted = [md5]
    else:
        accepted = [OFFICIAL_TARBALL_MD5[name]]
        accepted += [m for m, owner in KNOWN_REBUILT_MD5.items() if owner == name]
    root.mkdir(parents=True, exist_ok=True)
    target = root / spec.tarball
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{spec.tarball}.", suffix=".part")
    tmp = Path(tmp_name)
    log.info("downloading %s from %s to %s", spec.title, url, target)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        request = urllib.request.Request(url, headers={"User-Agent": "effsam"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        found = digest.hexdigest()
        if found not in accepted:
            raise ChecksumError(
                f"the {spec.title} download from {url} has md5 {found}, expected {accepted}; "
                "it was discarded. Try again, or fetch the file by hand."
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the response's socket, which the chained error would keep
        raise DatasetError(
            f"downloading {spec.title} from {url} failed: {exc}. If this machine has no internet "
            f"access, fetch the file elsewhere and put it at {target}."
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _missing_message(spec: CifarSpec, name: str, root: Path) -> str:
    searched = "\n".join(f"  {p}" for p in candidate_paths(name, root))
    return (
        f"{spec.title} not found. Looked for the tarball {spec.tarball} or the extracted "
        f"folder {spec.folder}/ at:\n{searched}\n"
        f"The data directory is the data_dir argument (CLI --data-dir), else ${ENV_DATA_DIR}, "
        f"else ./data. To get the data, pass download=True (CLI --download), or download "
        f"{CIFAR_URLS[name]} by hand into the data directory."
    )


def load_cifar(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    allow_unverified: bool = False,
) -> ImageData:
    """Finds, verifies and reads CIFAR-10 or CIFAR-100.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: Data directory (see :func:`resolve_data_dir`).
        download: Download the tarball if it is not found.
        allow_unverified: Skip the md5 checks.

    Returns:
        uint8 images ``[N, 3, 32, 32]`` with the papers' mean and std and ``augment="cifar"``.

    Raises:
        DatasetNotFoundError: If the data is absent and ``download`` is false.
        ChecksumError: If the data fails its checksum.
        CorruptDatasetError: If the data cannot be read.
    """
    spec = _spec(name)
    root = resolve_data_dir(data_dir)
    path = find_cifar(name, root)
    just_downloaded = False
    if path is None:
        if not download:
            raise DatasetNotFoundError(_missing_message(spec, name, root))
        path = download_cifar(name, root)
        just_downloaded = True  # checked against the expected md5 while downloading
    if not allow_unverified and not just_downloaded:
        verify_cifar(name, path)
    return read_cifar(name, path)
