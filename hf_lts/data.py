"""Image-classification data for the Trainer: loading, label maps, torch-only transforms, collation.

Transforms use torch ops only, never torchvision: the torchvision builds pip finds beside a CPU torch fail to
load, and once installed they break transformers' vision models. Images are turned into uint8 tensors and
transformed a batch at a time (datasets hands the DataLoader's whole index list to the transform), so
a 32×32 training image from the 8×8 digits costs about 0.1 ms, decoding included.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IMAGE_NAMES = ("image", "img", "pixel_values", "images")
_LABEL_NAMES = ("label", "labels", "fine_label", "target")
_EVAL_SPLITS = ("validation", "valid", "val", "test")
_EVAL_CROP_PCT = 0.875  # ImageNet convention: resize to 256, center-crop 224
_RRC_SCALE = (0.08, 1.0)  # random-resized-crop area range and aspect-ratio range, as in torchvision
_RRC_RATIO = (3 / 4, 4 / 3)
_RRC_TRIES = 10


# --- loading -----------------------------------------------------------------------------------------------


def load_image_dataset(
    name_or_path: str | os.PathLike,
    *,
    train_split: str = "train",
    eval_split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    validation_size: float = 0.2,
    seed: int = 0,
    **load_kwargs: Any,
) -> datasets.DatasetDict:
    """Load an image-classification dataset as a DatasetDict with "train" and "validation" splits.

    `name_or_path` is one of
      - "digits": scikit-learn's 1,797 8×8 digit images (ships with scikit-learn, no download);
      - "fashion_mnist": the 60k/10k Fashion-MNIST idx files (gzip or plain) from the Debian package
        dataset-fashion-mnist, or from `data_dir`; its test set is the validation split;
      - a folder: saved with `save_to_disk`, or an imagefolder tree (one sub-folder per class, optionally
        under train/ and test/ folders);
      - a Hub dataset id, loaded with `datasets.load_dataset(name, data_dir=data_dir, **load_kwargs)`.

    Only the image and label columns are kept, renamed "image" and "label"; the label becomes a ClassLabel
    (from ints or strings) so that `label_maps` has names and splits can be stratified. The validation split
    is `eval_split`, else the first of validation/valid/val/test present, else a stratified
    `validation_size` share of the train split drawn with `seed` (so "digits" gives 1,437/360).
    """
    name = os.fspath(name_or_path)
    if name == "digits":
        loaded = datasets.DatasetDict(train=_load_digits())
    elif name == "fashion_mnist":
        loaded = _load_fashion_mnist(Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR)
    elif os.path.isdir(name):
        if any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict(train=loaded)
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=name, **load_kwargs)
    else:
        loaded = datasets.load_dataset(name, data_dir=data_dir, **load_kwargs)

    if train_split not in loaded:
        raise ValueError(f"{name!r} has no split {train_split!r}; its splits are {list(loaded)}")
    if eval_split is None:
        eval_split = next((s for s in _EVAL_SPLITS if s in loaded and s != train_split), None)
    elif eval_split not in loaded:
        raise ValueError(f"{name!r} has no split {eval_split!r}; its splits are {list(loaded)}")

    splits = {"train": loaded[train_split]}
    if eval_split is not None:
        splits["validation"] = loaded[eval_split]
    image_col = _find_column(splits["train"], image_column, "image")
    label_col = _find_column(splits["train"], label_column, "label")
    splits = {k: _select_and_rename(ds, {image_col: "image", label_col: "label"}) for k, ds in splits.items()}
    splits = _with_class_labels(splits)
    if "validation" not in splits:
        splits["train"], splits["validation"] = _split(splits["train"], validation_size, seed)
    return datasets.DatasetDict(splits)


def label_maps(
    dataset: datasets.Dataset | datasets.DatasetDict, label_column: str | None = None
) -> tuple[dict[int, str], dict[str, int]]:
    """`(id2label, label2id)` for `model.config`: ClassLabel names, else "0".."max label"."""
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    column = _find_column(dataset, label_column, "label")
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        names = [str(i) for i in range(int(max(dataset.unique(column))) + 1)]
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def _find_column(ds: datasets.Dataset, explicit: str | None, kind: Literal["image", "label"]) -> str:
    columns = list(ds.column_names)
    param = f"{kind}_column"
    if explicit is not None:
        if explicit not in columns:
            raise ValueError(f"{param}={explicit!r} is not a column; the columns are {columns}")
        return explicit
    names, feature_type = (
        (_IMAGE_NAMES, datasets.Image) if kind == "image" else (_LABEL_NAMES, datasets.ClassLabel)
    )
    for name in names:
        if name in columns:
            return name
    typed = [c for c in columns if isinstance(ds.features[c], feature_type)]
    if len(typed) == 1:
        return typed[0]
    raise ValueError(
        f"cannot tell which column holds the {kind}s; the columns are {columns}. Pass {param}='<column>', "
        f"or name the column one of {list(names)}, or give it the only {feature_type.__name__} feature."
    )


def _select_and_rename(ds: datasets.Dataset, renames: dict[str, str]) -> datasets.Dataset:
    ds = ds.select_columns(list(renames))
    return ds.rename_columns({old: new for old, new in renames.items() if old != new})


def _with_class_labels(splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """Make "label" a ClassLabel with one mapping for all splits (encoding each split apart could differ)."""
    if isinstance(splits["train"].features["label"], datasets.ClassLabel):
        return splits
    values = set().union(*(ds.unique("label") for ds in splits.values()))
    if all(isinstance(v, str) for v in values):
        names = sorted(values)
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values):
        names = [str(i) for i in range(int(max(values)) + 1)]
    else:
        raise ValueError(
            "labels must be non-negative ints or strings, got " + repr(sorted(values, key=str)[:5])
        )
    feature = datasets.ClassLabel(names=names)
    return {k: ds.cast_column("label", feature) for k, ds in splits.items()}


def _split(ds: datasets.Dataset, size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Stratified where possible, since a small validation set can miss rare classes. Done with scikit-learn
    on the label array: `Dataset.train_test_split(stratify_by_column=...)` reads the labels row by row."""
    from sklearn.model_selection import train_test_split

    labels = ds.with_format("numpy", columns=["label"])[:]["label"]
    indices = np.arange(len(ds))
    try:
        train, val = train_test_split(indices, test_size=size, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single sample, or fewer validation samples than classes
        train, val = train_test_split(indices, test_size=size, random_state=seed)
    return ds.select(np.sort(train)), ds.select(np.sort(val))


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> datasets.Dataset:
    """N×H×W uint8 grayscale arrays as an Image feature (the Hub's layout for these datasets), stored as binary
    PGM, which PIL reads natively: encoding Fashion-MNIST's 70k images as PNG takes ~10 s, as PGM ~1 s."""
    header = b"P5 %d %d 255\n" % (images.shape[2], images.shape[1])
    blobs = [{"bytes": header + image.tobytes(), "path": None} for image in images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": blobs, "label": labels.tolist()}, features=features)


def _load_digits() -> datasets.Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 17 gray levels 0..16 → 0..255
    return _image_dataset(images, digits.target, [str(i) for i in range(10)])


def _load_fashion_mnist(folder: Path) -> datasets.DatasetDict:
    stems = {
        split: (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        for split, prefix in (("train", "train"), ("validation", "t10k"))
    }
    files = {stem: _find_idx_file(folder, stem) for pair in stems.values() for stem in pair}
    missing = [stem for stem, path in files.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files {missing} (plain or .gz) not found in {folder}. Install them with "
            "`apt-get install dataset-fashion-mnist` (into /usr/share/datasets/fashion-mnist/), "
            "or pass data_dir= pointing at a folder that holds them."
        )
    splits = {}
    for split, (image_stem, label_stem) in stems.items():
        images, labels = read_idx(files[image_stem]), read_idx(files[label_stem])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{files[image_stem]} and {files[label_stem]} do not hold N images and N labels "
                f"(shapes {images.shape} and {labels.shape})"
            )
        splits[split] = _image_dataset(images, labels, FASHION_MNIST_LABELS)
    return datasets.DatasetDict(splits)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte idx file (the MNIST format): 0, 0, type 0x08, ndim, big-endian dims, data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape}, but holds {len(data) - offset} bytes of data")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


# --- transforms --------------------------------------------------------------------------------------------


class ImageTransform:
    """Batch preprocessing with torch ops: PIL images or uint8 arrays → normalized float N×3×S×S.

    Grayscale images are repeated to 3 channels, other modes converted to RGB.

    `crop` picks the regime; "auto" is "padded" for `image_size` ≤ 64, where random-resized crops of a
    few pixels would destroy the content:
      - "padded" (CIFAR style): resize to S; training adds a zero border of S // 8 and takes a random S×S crop;
      - "resized" (ImageNet style): training takes a random-resized crop (area 8–100 %, aspect 3/4–4/3)
        scaled to S; evaluation resizes the short side to S / 0.875 and takes the center S×S crop.
    `hflip` adds random horizontal flips in training; turn it off for data that is not mirror-symmetric,
    such as digits. Mean and std come from `image_processor` (a transformers image processor or its config
    dict, read for `image_mean` / `image_std`), else ImageNet's.

    Randomness comes from `generator`, else torch's global RNG, which `Trainer`'s seed sets and the
    DataLoader seeds per worker, so a seed reproduces the augmentations. Leave `generator` unset with
    DataLoader workers: each worker would get a copy of it and repeat the same crops.
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        *,
        crop: Literal["auto", "padded", "resized"] = "auto",
        hflip: bool = True,
        image_processor: Any = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if crop not in ("auto", "padded", "resized"):
            raise ValueError(f"crop must be 'auto', 'padded' or 'resized', got {crop!r}")
        self.image_size = image_size
        self.train = train
        self.crop = ("padded" if image_size <= 64 else "resized") if crop == "auto" else crop
        self.hflip = hflip
        self.generator = generator
        mean, std = _normalization(image_processor)
        # (x / 255 - mean) / std as one subtraction and one multiplication, in place on the 0..255 batch
        self._shift = 255 * torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = 1 / (255 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        tensors = [_to_uint8_chw(image) for image in images]
        if self.train and self.crop == "resized":
            x = self._random_resized_crop(tensors)
        else:
            crop_pct = _EVAL_CROP_PCT if self.crop == "resized" else 1.0
            x = _resize_center_crop(tensors, round(self.image_size / crop_pct), self.image_size)
            if self.train:
                x = self._padded_random_crop(x)
        if self.train and self.hflip:
            flip = torch.rand(len(x), generator=self.generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.sub_(self._shift).mul_(self._scale)

    def _padded_random_crop(self, x: torch.Tensor) -> torch.Tensor:
        size, pad = self.image_size, max(1, self.image_size // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        offsets = (torch.rand(len(x), 2, generator=self.generator) * (2 * pad + 1)).long().tolist()
        return torch.stack(
            [p[:, i : i + size, j : j + size] for p, (i, j) in zip(padded, offsets, strict=True)]
        )

    def _random_resized_crop(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """torchvision's RandomResizedCrop: up to 10 tries of (area, aspect), else a center crop. A fixed
        number of draws per image keeps the stream of random numbers independent of the outcomes."""
        u = torch.rand(len(tensors), 2 * _RRC_TRIES + 2, generator=self.generator, dtype=torch.float64)
        log_lo, log_hi = math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1])
        crops = []
        for t, ui in zip(tensors, u, strict=True):
            height, width = t.shape[-2:]
            area = height * width * (_RRC_SCALE[0] + ui[:_RRC_TRIES] * (_RRC_SCALE[1] - _RRC_SCALE[0]))
            aspect = torch.exp(log_lo + ui[_RRC_TRIES : 2 * _RRC_TRIES] * (log_hi - log_lo))
            ws, hs = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
            fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
            if fits.any():
                k = int(fits.long().argmax())
                h, w = int(hs[k]), int(ws[k])
                top = int(ui[-2] * (height - h + 1))
                left = int(ui[-1] * (width - w + 1))
            else:
                h, w = _center_crop_box(height, width)
                top, left = (height - h) // 2, (width - w) // 2
            crop = t[None, :, top : top + h, left : left + w].float()
            crops.append(_resize(crop, (self.image_size, self.image_size)))
        return torch.cat(crops)


def _center_crop_box(height: int, width: int) -> tuple[int, int]:
    """Largest centered box whose aspect ratio lies in _RRC_RATIO (torchvision's fallback)."""
    ratio = width / height
    if ratio < _RRC_RATIO[0]:
        return round(width / _RRC_RATIO[0]), width
    if ratio > _RRC_RATIO[1]:
        return height, round(height * _RRC_RATIO[1])
    return height, width


def _normalization(image_processor: Any) -> tuple[Sequence[float], Sequence[float]]:
    if image_processor is None:
        return IMAGENET_MEAN, IMAGENET_STD
    if isinstance(image_processor, Mapping):
        mean, std = image_processor.get("image_mean"), image_processor.get("image_std")
    else:
        mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError("image_processor has no image_mean / image_std")
    mean, std = list(np.broadcast_to(mean, 3)), list(np.broadcast_to(std, 3))
    return [float(m) for m in mean], [float(s) for s in std]


def _to_uint8_chw(image: Any) -> torch.Tensor:
    if isinstance(image, PIL.Image.Image) and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"images must be PIL images or integer arrays in [0, 255], got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"images must be H×W or H×W×C with C in 1, 3, 4; got shape {array.shape}")
    tensor = torch.from_numpy(array[:, :, :3].astype(np.uint8)).permute(2, 0, 1)  # astype copies: writable
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _resize_center_crop(tensors: list[torch.Tensor], short_side: int, size: int) -> torch.Tensor:
    """Resize the short side to `short_side`, then crop the center size×size; float N×3×size×size.
    Images of one shape (the common case) go through a single batched interpolation."""

    def one_shape(x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        scale = short_side / min(height, width)
        x = _resize(x, (max(short_side, round(height * scale)), max(short_side, round(width * scale))))
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        return x[..., top : top + size, left : left + size]

    if all(t.shape == tensors[0].shape for t in tensors):
        return one_shape(torch.stack(tensors).float())
    return torch.cat([one_shape(t[None].float()) for t in tensors])


# --- datasets for the Trainer ------------------------------------------------------------------------------


def prepare_dataset(
    ds: datasets.Dataset,
    image_size: int,
    train: bool,
    *,
    crop: Literal["auto", "padded", "resized"] = "auto",
    hflip: bool = True,
    image_processor: Any = None,
    generator: torch.Generator | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> datasets.Dataset:
    """Return `ds` yielding {"pixel_values": float 3×S×S, "labels": int64}, transformed lazily on access.

    The columns are renamed to the model's argument names before the transform is attached, so that the
    Trainer's default `remove_unused_columns=True` keeps them; under "image" it would drop the image column
    before the transform ever saw it. Transform options are those of `ImageTransform`.
    """
    image_col = _find_column(ds, image_column, "image")
    label_col = _find_column(ds, label_column, "label")
    ds = _select_and_rename(ds, {image_col: "pixel_values", label_col: "labels"})
    transform = ImageTransform(
        image_size, train, crop=crop, hflip=hflip, image_processor=image_processor, generator=generator
    )
    return ds.with_transform(functools.partial(_transform_batch, transform))


def _transform_batch(transform: ImageTransform, batch: dict[str, list]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": transform(batch["pixel_values"]),
        "labels": torch.as_tensor(batch["labels"], dtype=torch.long),
    }


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`Trainer(data_collator=...)` for datasets from `prepare_dataset`."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.as_tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }
