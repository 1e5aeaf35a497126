import numpy as np
import pytest
import torch

from effsam.data import load_dataset
from effsam.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, decode_image
from effsam.data.loader import CorruptDatasetError, DatasetNotFoundError

PIL = pytest.importorskip("PIL.Image")


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(array).save(path)


def _solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture()
def folder(tmp_path):
    # Class folders deliberately created out of order: labels must follow the sorted names.
    colours = {"zebra": (250, 10, 10), "ant": (10, 250, 10), "moth": (10, 10, 250)}
    for split, count in (("train", 3), ("val", 2)):
        for name, rgb in colours.items():
            for i in range(count):
                _save(tmp_path / split / name / f"{i}.png", _solid(12 + i, 20, rgb))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


def test_layout_labels_and_sizes(folder):
    data = load_dataset("imagefolder", data_dir=folder, image_size=8)
    assert data.classes == ("ant", "moth", "zebra")
    assert data.num_classes == 3
    assert data.train_x.shape == (9, 3, 8, 8) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (6, 3, 8, 8)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    # Solid colours survive resizing, so each label's images keep their class colour.
    assert torch.all(data.train_x[0, 1] == 250) and torch.all(data.train_x[8, 0] == 250)
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD


def _thirds(h, third_w):
    img = np.zeros((h, 3 * third_w, 3), np.uint8)
    img[:, :third_w] = (255, 0, 0)
    img[:, third_w : 2 * third_w] = (0, 255, 0)
    img[:, 2 * third_w :] = (0, 0, 255)
    return img


def test_center_crop_without_resize(tmp_path):
    _save(tmp_path / "wide.png", _thirds(10, 10))
    out = decode_image(tmp_path / "wide.png", 10)
    # Shorter side already 10: the centred 10 x 10 crop is exactly the green third.
    expected = np.zeros((3, 10, 10), np.uint8)
    expected[1] = 255
    assert np.array_equal(out, expected)


def test_resize_shorter_side_then_center_crop(tmp_path):
    _save(tmp_path / "wide.png", _thirds(40, 40))
    out = decode_image(tmp_path / "wide.png", 10)
    # 40 x 120 -> 10 x 30, centre crop = the green third; filtering may blend its edge columns.
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    assert np.all(out[1, :, 1:-1] == 255) and np.all(out[0, :, 1:-1] == 0)
    assert np.all(out[2, :, 1:-1] == 0)


def test_grayscale_is_converted_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    PIL.fromarray(np.full((6, 6), 77, np.uint8), mode="L").save(path)
    out = decode_image(path, 4)
    assert out.shape == (3, 4, 4) and np.all(out == 77)


def test_missing_and_corrupt_folders(tmp_path, folder):
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("imagefolder", data_dir=tmp_path / "absent", image_size=8)
    (folder / "val" / "ant" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CorruptDatasetError, match="broken.png"):
        load_dataset("imagefolder", data_dir=folder, image_size=8)


def test_val_class_unknown_to_train_is_an_error(folder):
    _save(folder / "val" / "newt" / "0.png", _solid(8, 8, (1, 2, 3)))
    with pytest.raises(CorruptDatasetError, match="newt"):
        load_dataset("imagefolder", data_dir=folder, image_size=8)


def test_bad_image_size(folder):
    with pytest.raises(ValueError, match="-4"):
        load_dataset("imagefolder", data_dir=folder, image_size=-4)
