"""Save a converted checkpoint with orbax-checkpoint and load it back, skipping conversion.

A saved checkpoint is a directory::

    params/            orbax StandardCheckpointer pytree (numpy arrays, dtypes kept, bf16 too)
    model.json         {"format": 1, "config": ModelConfig fields, "source_dtype": ...}
    tokenizer/         tokenizer.save_pretrained(), when the checkpoint has a tokenizer

It is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written directory that a later start would trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from converters.checkpoint import Checkpoint
from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.models.layout import check_params, param_shapes

_FORMAT = 1


def config_to_dict(c: ModelConfig) -> dict:
    """JSON-ready fields of ``c``."""
    return dataclasses.asdict(c)


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of :func:`config_to_dict` (JSON turns tuples into lists and RopeScaling into a dict)."""
    fields = dict(d)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    fields["eos_token_ids"] = tuple(fields.get("eos_token_ids", ()))
    fields["id2label"] = tuple(fields.get("id2label", ()))
    fields["matryoshka_dimensions"] = tuple(fields.get("matryoshka_dimensions", ()))
    return ModelConfig(**fields)


def is_saved(directory: Path) -> bool:
    """Whether ``directory`` holds a complete saved checkpoint."""
    return (directory / "model.json").is_file() and (directory / "params").is_dir()


def save(checkpoint: Checkpoint, directory: Path) -> None:
    """Write ``checkpoint`` to ``directory`` (replacing whatever is there)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / "params", checkpoint.params)
        checkpointer.wait_until_finished()
    meta = {"format": _FORMAT, "config": config_to_dict(checkpoint.config), "source_dtype": checkpoint.source_dtype}
    (tmp / "model.json").write_text(json.dumps(meta, indent=2))
    if checkpoint.tokenizer is not None:
        checkpoint.tokenizer.save_pretrained(tmp / "tokenizer")
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.replace(tmp, directory)
    except OSError:
        # Another process (a second server, a test worker) saved the same checkpoint between the
        # two calls above: theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_saved(directory):
            raise


def load(directory: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save`."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not is_saved(directory):
        raise FileNotFoundError(f"no saved checkpoint in {directory}")
    meta = json.loads((directory / "model.json").read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"saved checkpoint {directory} has format={meta.get('format')}, expected {_FORMAT}")
    config = config_from_dict(meta["config"])
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params")
    params = check_params(params, param_shapes(config), "saved params")
    tokenizer = None
    if (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    return Checkpoint(config, params, tokenizer, meta["source_dtype"])
