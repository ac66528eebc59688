"""Uploading an LTS export with its model card to the Hugging Face Hub, with the plain huggingface_hub client.

Downloading needs nothing of ours: after ``import hf_lts``,
``AutoModelForImageClassification.from_pretrained(repo_id)`` fetches and rebuilds the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import httpx
from safetensors import SafetensorError, safe_open

from .card import CARD_FILE, add_deploy_section, write_model_card
from .config import LTSConfig
from .export.packed import PACKED_FORMAT

#: Never uploaded from an export folder: training checkpoints, temporary files of atomic writes, and the
#: pickled training arguments (local paths, possibly a Hub token).
UPLOAD_IGNORE = ["checkpoint-*", "_*", ".*", "*/.*", "training_args.bin"]


class HubUploadError(RuntimeError):
    """An upload that did not happen (Hub error, network error); the local export is untouched."""


def read_export(folder: str | os.PathLike) -> tuple[LTSConfig, dict[str, Any]]:
    """The `LTSConfig` and final statistics of a packed LTS export folder, after checking that it is one.

    Refuses a training checkpoint (full fp32 state) or a model saved without hf-lts, which must not be
    published as the export.
    """
    folder = Path(folder)
    try:
        quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"{folder.name} is not an LTS export: no config.json with a quantization_config ({e!r})."
        ) from e
    if quantization.get("quant_method") != "lts":
        raise ValueError(
            f"{folder.name} is not an LTS export: its quant_method is {quantization.get('quant_method')!r}."
        )
    weights = folder / "model.safetensors"
    try:
        if not weights.exists() and (folder / "model.safetensors.index.json").exists():  # a sharded export
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            weights = folder / next(iter(index["weight_map"].values()))
        with safe_open(weights, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, KeyError, StopIteration) as e:
        raise ValueError(f"{folder.name}/{weights.name} cannot be read: {e!r}") from e
    if metadata.get("lts_format") != PACKED_FORMAT:
        raise ValueError(
            f"{folder.name}/{weights.name} is not a packed LTS export (a training checkpoint?): save the "
            "trained model with model.save_pretrained() or trainer.save_model() to export it."
        )
    return LTSConfig.from_dict(quantization), json.loads(metadata.get("lts_stats", "{}"))


def push_export(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    run_as_future: bool = False,
) -> Any:
    """Upload an LTS export folder (`read_export`) to the Hub model repo ``repo_id``, creating it if needed.

    A folder without ``README.md`` first gets a card, built from its config and recorded statistics, written
    into it; a card without a "Deploy" section gets one when the folder has ``model.onnx``, which is uploaded
    with the rest. Returns the `CommitInfo`, or with ``run_as_future`` a future of it (whose upload errors then
    surface from the future). Raises `HubUploadError` when the Hub or the network fails, leaving the
    export's files as they were.
    """
    folder = Path(folder)
    config, stats = read_export(folder)
    message = commit_message or f"Upload W{config.weight_bits}A{config.activation_bits} LTS model"
    api = HfApi(endpoint=endpoint, token=token)
    with upload_errors(folder, repo_id, api.endpoint):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if not (folder / CARD_FILE).exists():
        write_model_card(folder, config, stats, repo_id=repo_id)
    add_deploy_section(folder, repo_id)  # an ONNX file exported after the card was written
    with upload_errors(folder, repo_id, api.endpoint):
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message,
            revision=revision,
            ignore_patterns=UPLOAD_IGNORE,
            run_as_future=run_as_future,
        )


@contextmanager
def upload_errors(folder: str | os.PathLike, repo_id: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn Hub and network failures into a `HubUploadError` that says where it went wrong and what is safe."""
    try:
        yield
    except (httpx.HTTPError, OSError) as e:
        where = f" on {endpoint}" if endpoint else ""
        raise HubUploadError(
            f"Could not upload {Path(folder).name} to {repo_id}{where}: {e}. The local export is unchanged; "
            "run `hf-lts push` again once the Hub is reachable."
        ) from e
