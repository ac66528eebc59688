"""The local Hub server (tests/helpers/hub_server.py) works with the real huggingface_hub and transformers clients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers.hub_server import HubServer
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from huggingface_hub.hf_api import RepoFile, RepoFolder
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

REPO_ID = "test-user/tiny"
FILES = ["config.json", "model.safetensors", "sub/notes.txt"]


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder like a saved model: JSON, a 4 MB safetensors file (uploaded through LFS) and a subfolder."""
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
    (folder / "sub" / "notes.txt").write_text("nested file")
    weights = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    save_file({"weight": weights}, str(folder / "model.safetensors"))
    return folder


def test_upload_folder_then_snapshot_download_gives_identical_bytes(
    hub_server: HubServer, model_folder: Path, tmp_path: Path
) -> None:
    api = HfApi()
    assert api.create_repo(REPO_ID).repo_id == REPO_ID
    assert api.create_repo(REPO_ID, exist_ok=True).repo_id == REPO_ID
    commit = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)

    assert sorted(api.list_repo_files(REPO_ID)) == FILES
    top_level = {entry.path: type(entry) for entry in api.list_repo_tree(REPO_ID)}
    assert top_level == {"config.json": RepoFile, "model.safetensors": RepoFile, "sub": RepoFolder}
    info = api.model_info(REPO_ID, files_metadata=True)
    assert info.sha == commit.oid
    lfs = {sibling.rfilename: sibling.lfs for sibling in info.siblings or []}
    assert lfs["model.safetensors"] is not None and lfs["config.json"] is None
    assert any(method == "PUT" and path.startswith("/lfs-objects/") for method, path in hub_server.requests)

    snapshot = Path(snapshot_download(REPO_ID, cache_dir=tmp_path / "empty_cache"))
    assert snapshot.name == commit.oid
    for name in FILES:
        assert (snapshot / name).read_bytes() == (model_folder / name).read_bytes()


def test_hf_hub_download_existence_checks_and_revisions(hub_server: HubServer, model_folder: Path) -> None:
    api = HfApi()
    api.create_repo(REPO_ID)
    first = api.upload_folder(repo_id=REPO_ID, folder_path=model_folder)
    # Module-level functions go through `huggingface_hub.hf_api.api`, which the fixture repoints too.
    huggingface_hub.upload_file(
        path_or_fileobj=b'{"hidden_size": 8}', path_in_repo="config.json", repo_id=REPO_ID
    )

    path = Path(hf_hub_download(REPO_ID, "config.json"))
    assert path.read_bytes() == b'{"hidden_size": 8}'
    assert path.is_relative_to(constants.HF_HUB_CACHE)  # the fixture's temporary cache
    old = hf_hub_download(REPO_ID, "config.json", revision=first.oid)
    assert Path(old).read_bytes() == (model_folder / "config.json").read_bytes()

    assert api.repo_exists(REPO_ID) and not api.repo_exists("test-user/missing")
    assert api.file_exists(REPO_ID, "model.safetensors") and not api.file_exists(REPO_ID, "missing.bin")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "missing.bin")


def test_transformers_push_to_hub_then_from_pretrained(hub_server: HubServer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = ResNetForImageClassification(config).eval()
    model.push_to_hub("test-user/tiny-resnet")

    loaded = AutoModelForImageClassification.from_pretrained(
        "test-user/tiny-resnet", cache_dir=tmp_path / "fresh"
    )
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits, loaded.eval()(pixel_values=pixels).logits)


def test_failed_commit_raises_hub_http_error(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO_ID)
    hub_server.fail_commit_status = 500

    with pytest.raises(HfHubHTTPError, match="Simulated commit failure") as excinfo:
        api.upload_file(path_or_fileobj=b"content", path_in_repo="file.txt", repo_id=REPO_ID)
    assert excinfo.value.response.status_code == 500
    assert api.list_repo_files(REPO_ID) == []


def test_subprocess_reads_the_fixture_settings_from_the_environment(hub_server: HubServer) -> None:
    HfApi().create_repo(REPO_ID)
    huggingface_hub.upload_file(path_or_fileobj=b"content", path_in_repo="file.txt", repo_id=REPO_ID)

    code = f"from huggingface_hub import hf_hub_download; print(hf_hub_download({REPO_ID!r}, 'file.txt'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = Path(run.stdout.strip())
    assert path.read_bytes() == b"content" and path.is_relative_to(constants.HF_HUB_CACHE)


def test_fixture_repoints_every_import_time_copy(request: pytest.FixtureRequest) -> None:
    """Guard against a library upgrade adding a copy of the endpoint or cache path that the fixture misses."""
    import transformers.modeling_utils  # noqa: F401  # load the modules the other tests use before scanning

    def hub_settings() -> dict[tuple[str, str], object]:
        """Module globals holding the configured endpoint or a path under HF_HOME, and HfApi endpoints."""
        roots = (constants.ENDPOINT, constants.HF_HOME, constants.HF_HUB_CACHE)
        found: dict[tuple[str, str], object] = {}
        for module_name, module in list(sys.modules.items()):
            if module is None or not module_name.startswith(("huggingface_hub", "transformers")):
                continue
            for name, value in list(vars(module).items()):
                if isinstance(value, HfApi):
                    found[module_name, name] = value.endpoint
                elif isinstance(value, str) and value.startswith(roots):
                    found[module_name, name] = value
        return found

    before = hub_settings()
    request.getfixturevalue("hub_server")
    after = hub_settings()
    # These two name huggingface.co itself rather than the configured endpoint.
    fixed = {
        ("huggingface_hub.constants", "_HF_DEFAULT_ENDPOINT"),
        ("huggingface_hub.constants", "HUGGINGFACE_CO_URL_HOME"),
    }
    assert [key for key, value in before.items() if key not in fixed and after.get(key) == value] == []
