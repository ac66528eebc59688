"""Shared pytest fixtures."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Iterator

import pytest
import torch
from helpers.hub_server import HubServer
from torch.utils.cpp_extension import get_cxx_compiler

#: The library runs without a C++ compiler (eagerly, after a warning); what needs one skips, saying why.
NO_COMPILER = shutil.which(get_cxx_compiler()) is None
NO_COMPILER_REASON = "no C++ compiler: the native CPU kernels and torch.compile on a CPU need one"

# Module globals that copy a Hub setting at import time, besides those of `huggingface_hub.constants`:
# setting the environment variable during a test does not reach them, so the fixture patches them too.
_IMPORT_TIME_COPIES = {
    "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": "hub"},
    "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": "assets"},
    "transformers.utils": {"HF_MODULES_CACHE": "modules"},
    "transformers.utils.hub": {"HF_MODULES_CACHE": "modules"},
    "transformers.dynamic_module_utils": {"HF_MODULES_CACHE": "modules"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if NO_COMPILER and item.get_closest_marker("native"):
            item.add_marker(pytest.mark.skip(reason=NO_COMPILER_REASON))


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """The test models are tiny: their ops run faster on one intra-op thread, and far faster when other
    processes share the cores (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_server(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[HubServer]:
    """A fresh local Hub (tests/helpers/hub_server.py) that huggingface_hub and transformers use instead of huggingface.co.

    The production code paths run unchanged: only the endpoint, cache and token settings are redirected, with
    a dummy token and a cache under a temporary HF_HOME, so the user's real cache and token are never touched.
    `huggingface_hub` reads its environment at import time, so setting HF_ENDPOINT & co. is not enough in this
    process: the fixture also patches `huggingface_hub.constants`, the module-level `HfApi` behind
    `huggingface_hub.create_repo`/`upload_folder`/..., transformers' lazily created `HfApi` and the module
    globals in `_IMPORT_TIME_COPIES`. The environment variables are set as well, so that subprocesses (CLI
    tests) started during the test read the same settings when they import the libraries.
    """
    from huggingface_hub import constants, hf_api

    home = tmp_path_factory.mktemp("hf_home")
    with HubServer(tmp_path_factory.mktemp("hub_storage")) as server:
        settings = {
            "HF_ENDPOINT": server.url,
            "HF_HUB_DISABLE_XET": "1",  # the server speaks git-LFS, not Xet
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_TOKEN": "hf_dummy_token_for_local_hub",
        }
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        for name in (
            "HF_OIDC_RESOURCE",
            "HUGGING_FACE_HUB_TOKEN",
            "HUGGINGFACE_CO_STAGING",
            "TRANSFORMERS_OFFLINE",
        ):
            monkeypatch.delenv(name, raising=False)

        # Paths derived from HF_HOME at import (token, registry and update-check files, legacy cache names).
        real_home = constants.HF_HOME
        for name, value in list(vars(constants).items()):
            if isinstance(value, str) and value.startswith(real_home):
                monkeypatch.setattr(constants, name, str(home) + value[len(real_home) :])
        for name in ("HF_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH"):
            monkeypatch.setattr(constants, name, settings[name])
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        # Hosts trusted with the token and for redirects, which include the configured endpoint's.
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(hf_api.api, "endpoint", server.url)

        # Import before patching: a module first imported during the test would keep the temporary paths.
        for module_name, names in _IMPORT_TIME_COPIES.items():
            module = importlib.import_module(module_name)
            for name, subdir in names.items():
                monkeypatch.setattr(module, name, str(home / subdir))
        # Reset rather than patch: transformers creates its HfApi on first use, from `constants.ENDPOINT`.
        monkeypatch.setattr("transformers.utils.hub._hf_api", None)
        yield server


@pytest.fixture(params=["native", "compiled", "eager"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each kernel backend in turn, for layers and scratcher alike (`hf_lts.quantization.backend`): the GPU's
    ``compiled`` path runs here on the CPU."""
    from hf_lts.quantization import backend as backends

    if NO_COMPILER and request.param != "eager":
        pytest.skip(NO_COMPILER_REASON)
    with backends.forced(request.param):
        yield request.param
