"""Trained GMSA weights on disk: safetensors + JSON, no pickle, checked by sha256 before use.

A checkpoint directory holds only what training changed (encoder LoRA, LSA, tuned decoder parts,
a merger's own weights), never the backbone::

    model.safetensors    the trained tensors (``trained_state_dict`` names), by default in bf16
    gmsa_config.json     the GMSAConfig, with the backbone's fingerprint
    manifest.json        gmsa version and the sha256 of model.safetensors

:func:`write_checkpoint` writes one atomically, :func:`read_checkpoint` verifies and reads one, :func:`load_trained`
copies the tensors into a model. Hashing (:func:`file_sha256`) lives here for every file gmsa
checks: checkpoints, training state, stored contexts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, GMSAConfig
from .model import GMSAModel, trained_state_dict
from .version import __version__

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
DEFAULT_CHECKPOINT = Path(__file__).parent / "pretrained" / "gmsa-smollm2-135m"
ID_CHARS = 16  # a checkpoint's id: the first hex digits of its weights' sha256


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another backbone."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found in a checkpoint directory."""

    directory: Path
    config: GMSAConfig
    weights: dict[str, torch.Tensor]
    checkpoint_id: str


def write_checkpoint(
    directory: str | os.PathLike,
    config: GMSAConfig,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype | None = torch.bfloat16,
) -> None:
    """Write ``weights`` (cast to ``dtype``; ``None`` keeps theirs), ``config`` and the manifest to ``directory``.

    Written into a staging directory next to it and renamed into place: a reader never sees half a checkpoint.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        state = {name: (tensor.to(dtype) if dtype else tensor).contiguous() for name, tensor in weights.items()}
        save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt", "gmsa_version": __version__})
        config.save(staging)
        manifest = {"gmsa_version": __version__, "sha256": {WEIGHTS_NAME: file_sha256(staging / WEIGHTS_NAME)}}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in [staging, *staging.iterdir()]:  # mkdtemp/safetensors make them private
            path.chmod(0o755 if path.is_dir() else 0o644)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_checkpoint(directory: str | os.PathLike | None = None) -> Checkpoint:
    """The config and verified weights of a checkpoint directory (default: the shipped one).

    A missing file, a manifest that does not parse or weights that do not match their sha256
    are a :class:`CheckpointError`.
    """
    directory = Path(directory) if directory is not None else DEFAULT_CHECKPOINT
    if not (directory / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"no GMSA checkpoint at {directory} (expected {WEIGHTS_NAME} and {CONFIG_NAME})")
    config = GMSAConfig.load(directory)
    digest = verified_sha256(directory)
    try:
        weights = load_file(directory / WEIGHTS_NAME)
    except SafetensorError as err:
        raise CheckpointError(f"cannot read {directory / WEIGHTS_NAME}: {err}") from err
    return Checkpoint(directory, config, weights, digest[:ID_CHARS])


def verified_sha256(directory: Path) -> str:
    """The sha256 of the directory's weights, after checking it against the manifest."""
    manifest_path = directory / MANIFEST_NAME
    try:
        expected = json.loads(manifest_path.read_text())["sha256"][WEIGHTS_NAME]
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest_path} is missing or corrupt ({err})") from err
    actual = file_sha256(directory / WEIGHTS_NAME)
    if actual != expected:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} does not match its checksum: the file is corrupt")
    return actual


def check_backbone(config: GMSAConfig, fingerprint: str, source: object) -> None:
    """Raise unless a backbone with ``fingerprint`` is the one the checkpoint ``source`` was trained on."""
    if config.backbone_fingerprint and fingerprint != config.backbone_fingerprint:
        raise CheckpointError(
            f"{source} was trained on backbone {config.backbone!r} with fingerprint "
            f"{config.backbone_fingerprint}, but the loaded backbone has fingerprint {fingerprint}"
        )


def on_device_of(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` on ``reference``'s device (the default placement of :func:`load_trained`)."""
    return full.to(reference.device)


def load_trained(
    model: GMSAModel,
    weights: dict[str, torch.Tensor],
    source: object = "checkpoint",
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = on_device_of,
) -> None:
    """Copy trained tensors into ``model``; the key sets and shapes must match exactly.

    ``place(full, parameter)`` lays a full tensor out like the parameter it goes into: a training
    run under FSDP passes ``gmsa.training.distributed.shard_like`` (this rank's shard).
    """
    expected = trained_state_dict(model)
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model config: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            if tensor.shape != weights[name].shape:
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(weights[name].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(place(weights[name], tensor))
