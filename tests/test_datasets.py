"""Dataset registry: real Fashion-MNIST, a CIFAR-10 archive built from real images, folders."""

import gzip
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.data import datasets
from pipeline.data.datasets import DatasetError, ImageDataset, available_datasets, load_dataset


def _write_idx(path, array):
    """An IDX file as Yann LeCun's format (and torchvision's raw/ folder) lays it out."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_registry_lists_the_four_datasets():
    assert available_datasets() == ["cifar10", "fashion-mnist", "hf-dataset", "image-folder"]


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DatasetError, match=r"unknown dataset 'mnist-ish'.*cifar10.*fashion-mnist"):
        load_dataset("mnist-ish")


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_debian_package(data_fashion_mnist):
    ds = data_fashion_mnist
    assert ds.name == "fashion-mnist"
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    # The published dataset is exactly balanced: 6000 train and 1000 test images per class.
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    assert 0 < ds.train_images.mean() < 255  # real pixels, not an empty buffer


def test_fashion_mnist_from_torchvision_root(tmp_path, monkeypatch, data_fashion_mnist):
    real = data_fashion_mnist
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte.gz", real.train_images[:50, ..., 0])
    _write_idx(raw / "train-labels-idx1-ubyte.gz", real.train_labels[:50])
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", real.test_images[:20, ..., 0])
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", real.test_labels[:20])
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    ds = load_dataset("fashion-mnist", root=tmp_path)
    np.testing.assert_array_equal(ds.train_images, real.train_images[:50])
    np.testing.assert_array_equal(ds.test_labels, real.test_labels[:20])


def test_fashion_mnist_missing_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", root=tmp_path / "empty")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "torchvision root" in str(err.value)
    assert not (tmp_path / "empty").exists()  # download=False touches nothing


def test_fashion_mnist_truncated_file_is_refused(tmp_path, monkeypatch, data_fashion_mnist):
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem, arr in [("train-images-idx3-ubyte", data_fashion_mnist.train_images[:10, ..., 0]),
                      ("train-labels-idx1-ubyte", data_fashion_mnist.train_labels[:10]),
                      ("t10k-images-idx3-ubyte", data_fashion_mnist.test_images[:10, ..., 0]),
                      ("t10k-labels-idx1-ubyte", data_fashion_mnist.test_labels[:10])]:
        _write_idx(raw / f"{stem}.gz", arr)
    with gzip.open(raw / "train-images-idx3-ubyte.gz") as f:
        data = f.read()
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-100])
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("fashion-mnist", root=tmp_path)


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture()
def cifar_fabricated(monkeypatch):
    """The fixture's archive is fabricated: its batches cannot have the published md5s."""
    monkeypatch.setenv("CIFAR10_SKIP_MD5", "1")


def test_cifar10_reads_the_pickle_layout(data_cifar10_root, cifar_fabricated):
    root, train_x, train_y, test_x, test_y = data_cifar10_root
    ds = load_dataset("cifar10", root=root)
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    np.testing.assert_array_equal(ds.train_images, train_x)
    np.testing.assert_array_equal(ds.train_labels, train_y)
    # The test split is the 20 real CIFAR-10 images, pixel for pixel, HWC order.
    np.testing.assert_array_equal(ds.test_images, test_x)
    np.testing.assert_array_equal(ds.test_labels, test_y)


def test_cifar10_layout_is_the_documented_one(data_cifar10_root, cifar_fabricated):
    """The CIFAR page's layout: each row is 1024 red, then green, then blue bytes, row-major."""
    root = data_cifar10_root[0]
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][3]
    img = load_dataset("cifar10", root=root).test_images[3]
    for ch in range(3):
        np.testing.assert_array_equal(row[1024 * ch:1024 * (ch + 1)], img[..., ch].ravel())
    # And it is a real photo: its channels are strongly correlated, unlike scrambled bytes.
    assert np.corrcoef(img.reshape(-1, 3).T.astype(float)).min() > 0.5


def test_cifar10_without_root_says_how(monkeypatch):
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    with pytest.raises(DatasetError, match="root=DIR.*download=True"):
        load_dataset("cifar10")


def test_cifar10_missing_batch_is_named(tmp_path, data_cifar10_root):
    import shutil

    shutil.copytree(data_cifar10_root[0] / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_corrupt_batch_is_refused(tmp_path, data_cifar10_root, cifar_fabricated):
    import shutil

    base = tmp_path / "cifar-10-batches-py"
    shutil.copytree(data_cifar10_root[0] / "cifar-10-batches-py", base)
    (base / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_2"):
        load_dataset("cifar10", root=tmp_path)
    with open(base / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(DatasetError, match="CIFAR layout"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_batches_without_the_published_md5_are_not_unpickled(tmp_path, monkeypatch,
                                                                      data_cifar10_root):
    """Before any file is unpickled: each batch against its published md5, and the archive
    when it lies beside the folder; the error names the file and how to get a good copy."""
    import shutil

    from pipeline.data import cifar

    monkeypatch.delenv("CIFAR10_SKIP_MD5", raising=False)
    base = tmp_path / "cifar-10-batches-py"
    shutil.copytree(data_cifar10_root[0] / "cifar-10-batches-py", base)
    unpickled = []
    with monkeypatch.context() as m:
        m.setattr(cifar, "_unpickle", lambda path: unpickled.append(path))
        with pytest.raises(DatasetError, match=r"data_batch_1 does not have the published md5 "
                                               r"c99cafc152244af753f735de768cd75f.*unpack "
                                               r"cifar-10-python.tar.gz"):
            load_dataset("cifar10", root=tmp_path)
        (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half a download")
        with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz does not have "
                                               r"CIFAR-10's published md5 c58f30108f718f92"):
            load_dataset("cifar10", root=tmp_path)
    assert not unpickled
    # Files with the listed md5s are read: the check is the md5 itself, not a size or a name.
    monkeypatch.setattr(cifar, "FILE_MD5", {name: cifar._md5(base / name)
                                            for name in cifar.FILE_MD5 if (base / name).exists()})
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", cifar._md5(tmp_path / "cifar-10-python.tar.gz"))
    assert load_dataset("cifar10", root=tmp_path).num_classes == 10


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch hostile-pickle-ran",))


def test_cifar10_pickle_naming_other_objects_is_refused_not_built(tmp_path, monkeypatch,
                                                                  data_cifar10_root,
                                                                  cifar_fabricated):
    """Even with the checksums skipped (a fabricated archive), a batch is unpickled with
    numpy arrays, lists, dicts and strings only: anything else is refused, never called."""
    import shutil

    monkeypatch.chdir(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    shutil.copytree(data_cifar10_root[0] / "cifar-10-batches-py", base)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": _Hostile(), "labels": [0]}, f)
    with pytest.raises(DatasetError, match=r"test_batch.*asks for posix.system"):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "hostile-pickle-ran").exists()


# --------------------------------------------------------------------------- image folder


def _save_folder(root, images, labels, names):
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = root / names[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(d / f"{i:03d}.png")


def test_image_folder_with_train_test_and_a_corrupt_file(tmp_path, data_foolbox_cifar10):
    images, labels = data_foolbox_cifar10
    names = list(datasets.CIFAR10_CLASSES)
    _save_folder(tmp_path / "train", images[:14], labels[:14], names)
    _save_folder(tmp_path / "test", images[14:], labels[14:], names)
    bad_class = names[labels[0]]
    (tmp_path / "train" / bad_class / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "train" / bad_class / "notes.txt").write_text("not an image, ignored")
    # Documented behaviour: an unreadable image is skipped with a warning naming it.
    with pytest.warns(UserWarning, match="zz-corrupt.png"):
        ds = load_dataset("image-folder", root=tmp_path)
    present = sorted({names[v] for v in labels[:14]})
    assert ds.class_names == tuple(present)
    assert len(ds.train_labels) == 14 and len(ds.test_labels) == 6
    assert ds.image_shape == (32, 32, 3)
    # Every loaded image is one of the real images, under its own class name.
    for img, lab in zip(ds.train_images, ds.train_labels):
        match = np.flatnonzero((images[:14] == img).all(axis=(1, 2, 3)))
        assert len(match) == 1 and names[labels[match[0]]] == ds.class_names[lab]


def test_image_folder_grey_and_stratified_test_split(tmp_path, data_fashion_mnist):
    ds0 = data_fashion_mnist
    idx = np.concatenate([np.flatnonzero(ds0.train_labels == c)[:10] for c in (0, 1, 7)])
    _save_folder(tmp_path, ds0.train_images[idx], ds0.train_labels[idx],
                 {0: "top", 1: "trouser", 7: "sneaker"})
    ds = load_dataset("image-folder", root=tmp_path, test_fraction=0.2, seed=1)
    assert ds.class_names == ("sneaker", "top", "trouser")
    assert ds.image_shape == (28, 28, 1)  # grey detected, one channel kept
    assert np.bincount(ds.test_labels).tolist() == [2, 2, 2]  # stratified 20%
    assert np.bincount(ds.train_labels).tolist() == [8, 8, 8]
    again = load_dataset("image-folder", root=tmp_path, test_fraction=0.2, seed=1)
    np.testing.assert_array_equal(ds.test_images, again.test_images)


def test_image_folder_mixed_sizes_need_image_size(tmp_path, data_foolbox_cifar10):
    images, _ = data_foolbox_cifar10
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "a" / "0.png")
    Image.fromarray(images[1]).resize((40, 40)).save(tmp_path / "b" / "1.png")
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("image-folder", root=tmp_path, test_fraction=0.0)
    ds = load_dataset("image-folder", root=tmp_path, image_size=(32, 32), test_fraction=0.0)
    assert ds.train_images.shape == (2, 32, 32, 3)


def test_image_folder_without_classes_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="root=DIR"):
        load_dataset("image-folder", root=tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset("image-folder", root=tmp_path)


def test_image_dataset_rejects_wrong_arrays():
    x = np.zeros((2, 4, 4, 1), np.uint8)
    y = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("t", ("a",), x.astype(np.float32), y, x, y)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset("t", ("a",), x, y[:1], x, y)
