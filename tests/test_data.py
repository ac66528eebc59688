"""hf_lts.data: loaders (digits, Fashion-MNIST idx files, image folders), column detection, transforms."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_lts.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    collate_fn,
    label_maps,
    load_image_dataset,
    prepare_dataset,
)


@pytest.fixture(scope="module")
def digits() -> datasets.DatasetDict:
    return load_image_dataset("digits")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# --- digits ------------------------------------------------------------------------------------------------


def test_digits_split_is_stratified_80_20(digits: datasets.DatasetDict) -> None:
    assert set(digits) == {"train", "validation"}
    assert (digits["train"].num_rows, digits["validation"].num_rows) == (1437, 360)
    assert digits["train"].column_names == ["image", "label"]
    assert isinstance(digits["train"].features["image"], datasets.Image)
    val_counts = np.bincount(digits["validation"]["label"], minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # 20 % of ~180 per class
    image = digits["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    assert _pixels(image).max() <= 255


def test_digits_split_is_deterministic(digits: datasets.DatasetDict) -> None:
    again = load_image_dataset("digits")
    assert again["validation"]["label"][:] == digits["validation"]["label"][:]
    assert np.array_equal(_pixels(again["validation"][7]["image"]), _pixels(digits["validation"][7]["image"]))
    other = load_image_dataset("digits", seed=1)
    assert other["validation"]["label"][:] != digits["validation"]["label"][:]


def test_label_maps(digits: datasets.DatasetDict) -> None:
    id2label, label2id = label_maps(digits)
    assert id2label == {i: str(i) for i in range(10)}
    assert label2id == {str(i): i for i in range(10)}
    plain = datasets.Dataset.from_dict({"image": [0, 0, 0], "target": [0, 3, 1]})
    assert label_maps(plain)[0] == {0: "0", 1: "1", 2: "2", 3: "3"}


# --- Fashion-MNIST idx files -------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion_mnist(folder: Path, suffix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, n in (("train", "train", 12), ("validation", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = images, labels
    return arrays


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_fashion_mnist_from_idx_files(tmp_path: Path, suffix: str) -> None:
    arrays = _fake_fashion_mnist(tmp_path, suffix)
    ds = load_image_dataset("fashion_mnist", data_dir=tmp_path)
    assert ds["train"].features["label"].names == list(FASHION_MNIST_LABELS)
    for split, (images, labels) in arrays.items():
        assert ds[split].num_rows == len(labels)
        assert ds[split]["label"][:] == labels.tolist()
        for i in (0, len(labels) - 1):
            assert np.array_equal(_pixels(ds[split][i]["image"]), images[i])


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_image_dataset("fashion_mnist", data_dir=tmp_path)
    assert "data_dir" in str(info.value)


def test_fashion_mnist_rejects_truncated_file(tmp_path: Path) -> None:
    _fake_fashion_mnist(tmp_path, "")
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        load_image_dataset("fashion_mnist", data_dir=tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_package_file_names() -> None:
    names = {p.name for p in FASHION_MNIST_DIR.iterdir()}
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            stem = f"{prefix}-{kind}-ubyte"
            assert stem in names or f"{stem}.gz" in names


# --- folders and column detection --------------------------------------------------------------------------


def _write_pngs(folder: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for label, size in (("cat", (20, 14)), ("dog", (12, 30))):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(array).save(folder / label / f"{i}.png")


def test_imagefolder_labels_from_folder_names(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", per_class=5)
    _write_pngs(tmp_path / "test", per_class=2)
    ds = load_image_dataset(tmp_path)
    assert ds["train"].features["label"].names == ["cat", "dog"]
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (10, 4)
    assert sorted(ds["validation"]["label"][:]) == [0, 0, 1, 1]
    sizes = {ds["train"][i]["image"].size: ds["train"][i]["label"] for i in range(10)}
    assert sizes == {(14, 20): 0, (30, 12): 1}  # PIL sizes are (width, height)


def test_imagefolder_without_eval_split_is_split_with_seed(tmp_path: Path) -> None:
    _write_pngs(tmp_path, per_class=10)
    ds = load_image_dataset(tmp_path, validation_size=0.2, seed=3)
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (16, 4)
    assert sorted(ds["validation"]["label"][:]) == [0, 0, 1, 1]


def test_saved_dataset_with_custom_columns_and_string_labels(tmp_path: Path) -> None:
    images = [Image.new("RGB", (4, 4), color) for color in ("red", "blue", "red", "blue", "red", "blue")]
    raw = datasets.Dataset.from_dict(
        {"picture": images, "kind": ["b", "a", "b", "a", "b", "a"], "id": list(range(6))},
        features=datasets.Features(
            {"picture": datasets.Image(), "kind": datasets.Value("string"), "id": datasets.Value("int64")}
        ),
    )
    raw.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError) as info:
        load_image_dataset(tmp_path / "saved", validation_size=0.34)
    message = str(info.value)
    assert "['picture', 'kind', 'id']" in message and "label_column=" in message

    ds = load_image_dataset(tmp_path / "saved", label_column="kind", validation_size=0.34)
    assert ds["train"].column_names == ["image", "label"]
    assert ds["train"].features["label"].names == ["a", "b"]
    for split in ds.values():
        for example in split:
            assert example["label"] == (0 if example["image"].getpixel((0, 0)) == (0, 0, 255) else 1)


def test_missing_image_column_lists_columns() -> None:
    ds = datasets.Dataset.from_dict({"foo": [1, 2], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"\['foo', 'label'\].*image_column="):
        prepare_dataset(ds, 8, train=False)
    with pytest.raises(ValueError, match="is not a column"):
        prepare_dataset(ds, 8, train=False, image_column="bar")


# --- transforms --------------------------------------------------------------------------------------------


def _normalized(value: float, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return (value / 255 - torch.tensor(mean)) / torch.tensor(std)


def test_eval_transform_shapes_channels_and_normalization() -> None:
    gray = Image.new("L", (8, 8), 100)
    rgba = Image.new("RGBA", (50, 30), (10, 20, 30, 40))
    out = ImageTransform(32, train=False)([gray, np.full((5, 7), 100, np.uint8)])
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, _normalized(100).view(1, 3, 1, 1).expand_as(out), atol=1e-5)

    state = torch.get_rng_state()
    out = ImageTransform(224, train=False)([rgba, gray])  # mixed sizes: resize 256 short side, crop 224
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(out[0], _normalized(torch.tensor([10.0, 20.0, 30.0])).view(3, 1, 1), atol=1e-5)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws no random numbers


def test_center_crop_keeps_the_middle() -> None:
    array = np.zeros((40, 80), np.uint8)
    array[:, 20:60] = 255  # the middle 40×40 square is white
    out = ImageTransform(40, train=False, crop="padded")([array])
    assert torch.allclose(out, _normalized(255).view(1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_mean_std_from_image_processor() -> None:
    from transformers import ConvNextImageProcessorPil

    image = [np.full((4, 4, 3), 255, np.uint8)]
    processor = ConvNextImageProcessorPil(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    assert torch.allclose(ImageTransform(4, train=False, image_processor=processor)(image), torch.tensor(2.0))
    config = {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}
    assert torch.allclose(ImageTransform(4, train=False, image_processor=config)(image), torch.tensor(1.0))


@pytest.mark.parametrize("crop", ["padded", "resized"])
def test_train_augmentation_is_random_and_reproducible(crop: str) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(16)]
    transform = ImageTransform(32, train=True, crop=crop)
    torch.manual_seed(0)
    first = transform(images)
    torch.manual_seed(0)
    assert torch.equal(transform(images), first)
    assert not torch.equal(transform(images), first)
    assert first.shape == (16, 3, 32, 32)

    def with_generator(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return ImageTransform(32, train=True, crop=crop, generator=generator)(images)

    assert torch.equal(with_generator(1), with_generator(1))
    assert not torch.equal(with_generator(1), with_generator(2))


def test_padded_crop_shifts_in_zero_border() -> None:
    white = [np.full((32, 32), 255, np.uint8)] * 64
    out = ImageTransform(32, train=True, crop="padded", hflip=False)(white)
    black, full = _normalized(0)[0].item(), _normalized(255)[0].item()
    values = out[:, 0]
    assert torch.all(torch.isclose(values, torch.tensor(black)) | torch.isclose(values, torch.tensor(full)))
    shifted = (torch.isclose(values, torch.tensor(black)).flatten(1).any(1)).sum()
    assert shifted > 48  # only 1 in 81 offsets, (4, 4), is the unshifted crop
    assert torch.isclose(values, torch.tensor(black)).flatten(1).sum(1).max() <= 32 * 4 * 2


def test_hflip_is_optional() -> None:
    half = np.zeros((32, 32), np.uint8)
    half[:, :16] = 255  # white left half
    torch.manual_seed(0)

    def left_brighter(hflip: bool) -> torch.Tensor:
        out = ImageTransform(32, train=True, crop="padded", hflip=hflip)([half] * 64)
        return out[..., :16].mean((1, 2, 3)) > out[..., 16:].mean((1, 2, 3))

    assert left_brighter(False).all()
    flipped = (~left_brighter(True)).sum()
    assert 10 < flipped < 54


def test_prepare_dataset_and_collate(digits: datasets.DatasetDict) -> None:
    train = prepare_dataset(digits["train"], 32, train=True, hflip=False)
    assert train.column_names == ["pixel_values", "labels"]  # the names the Trainer keeps
    example = train[0]
    assert example["pixel_values"].shape == (3, 32, 32) and example["pixel_values"].dtype == torch.float32
    assert example["labels"].dtype == torch.int64 and example["labels"].item() == digits["train"][0]["label"]

    torch.manual_seed(0)
    batch = collate_fn(train.__getitems__(list(range(8))))
    torch.manual_seed(0)
    again = collate_fn(train.__getitems__(list(range(8))))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].shape == (8,)
    assert torch.equal(batch["pixel_values"], again["pixel_values"])
    assert batch["labels"].tolist() == digits["train"]["label"][:8]

    val = prepare_dataset(digits["validation"], 32, train=False)
    assert torch.equal(val[:4]["pixel_values"], val[:4]["pixel_values"])
    assert digits["train"].column_names == ["image", "label"]  # the input is left untouched
