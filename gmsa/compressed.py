"""Soft tokens of compressed contexts, with the metadata needed to reuse them safely."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .version import __version__


class IncompatibleContextError(ValueError):
    """Stored soft tokens were made by another backbone, checkpoint or gmsa version."""


CHECKSUM_KEY = "soft_tokens_sha256"


def soft_tokens_sha256(tensors: list[torch.Tensor]) -> str:
    """A checksum of the shapes, dtypes and bytes of ``tensors``, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Compressed:
    """Compressed contexts: one ``(n_i, H)`` tensor of soft tokens per input text.

    Attributes:
        soft_tokens: per text, ``ceil(n_tokens / rate)`` vectors in the decoder's input space.
        rates: compression rate used for each text.
        n_tokens: number of context tokens each text had before compression.
        backbone_fingerprint: checksum of the backbone (see ``gmsa.backbone.fingerprint``).
        checkpoint_id: checksum of the trained GMSA weights that produced the soft tokens.
        gmsa_version: version of gmsa that wrote them.
    """

    soft_tokens: list[torch.Tensor]
    rates: list[int]
    n_tokens: list[int]
    backbone_fingerprint: str = ""
    checkpoint_id: str = ""
    gmsa_version: str = __version__
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_embeddings(
        cls,
        embeddings: list[torch.Tensor],
        rate: int,
        n_tokens: list[int],
        backbone_fingerprint: str,
        checkpoint_id: str,
        extra: dict | None = None,
    ) -> Compressed:
        """Texts given as ``(n_i, H)`` vectors, all made at one ``rate`` from ``n_tokens[i]`` context tokens."""
        rates = [rate] * len(embeddings)
        return cls(
            list(embeddings), rates, list(n_tokens), backbone_fingerprint, checkpoint_id, extra=dict(extra or {})
        )

    @classmethod
    def concat(cls, parts: list[Compressed]) -> Compressed:
        """One :class:`Compressed` holding every text of ``parts``, in order (``extra`` from the first).

        The parts must come from one backbone, checkpoint and gmsa version.
        """
        first = parts[0]
        for part in parts[1:]:
            if part.made_by != first.made_by:
                raise IncompatibleContextError(f"cannot join soft tokens made by {part.made_by} and {first.made_by}")
        return replace(
            first,
            soft_tokens=[tokens for part in parts for tokens in part.soft_tokens],
            rates=[rate for part in parts for rate in part.rates],
            n_tokens=[n for part in parts for n in part.n_tokens],
            extra=dict(first.extra),
        )

    def joined(self) -> Compressed:
        """One text whose soft tokens are those of every text here, in order (at the first text's rate)."""
        return replace(
            self,
            soft_tokens=[torch.cat(self.soft_tokens)],
            rates=[self.rates[0]],
            n_tokens=[sum(self.n_tokens)],
            extra=dict(self.extra),
        )

    @property
    def made_by(self) -> tuple[str, str, str]:
        """``(backbone_fingerprint, checkpoint_id, gmsa_version)``: what must match to reuse the soft tokens."""
        return self.backbone_fingerprint, self.checkpoint_id, self.gmsa_version

    def __len__(self) -> int:
        return len(self.soft_tokens)

    def __getitem__(self, index: int | slice) -> Compressed:
        picked = range(len(self))[index]
        picked = picked if isinstance(picked, range) else [picked]
        return replace(
            self,
            soft_tokens=[self.soft_tokens[i] for i in picked],
            rates=[self.rates[i] for i in picked],
            n_tokens=[self.n_tokens[i] for i in picked],
            extra=dict(self.extra),
        )

    @property
    def n_soft_tokens(self) -> list[int]:
        return [int(t.shape[0]) for t in self.soft_tokens]

    @property
    def compression_ratio(self) -> float:
        """Context tokens per soft token, over all texts."""
        return sum(self.n_tokens) / max(1, sum(self.n_soft_tokens))

    def padded(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All soft tokens right-padded into ``(B, N, H)`` with a ``(B, N)`` mask."""
        width = max(self.n_soft_tokens)
        first = self.soft_tokens[0]
        soft = first.new_zeros(len(self), width, first.shape[-1])
        mask = torch.zeros(len(self), width, dtype=torch.long)
        for i, tokens in enumerate(self.soft_tokens):
            soft[i, : tokens.shape[0]] = tokens
            mask[i, : tokens.shape[0]] = 1
        return soft.to(device or first.device), mask.to(device or first.device)

    def save(self, path: str | os.PathLike) -> None:
        """Write soft tokens + metadata (with a checksum of the tensors) to one safetensors file, atomically."""
        tensors = {f"soft.{i}": t.detach().contiguous().cpu() for i, t in enumerate(self.soft_tokens)}
        meta = {k: v for k, v in asdict(self).items() if k != "soft_tokens"}
        meta[CHECKSUM_KEY] = soft_tokens_sha256(list(tensors.values()))
        path = Path(path)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        os.close(handle)
        try:
            save_file(tensors, tmp, metadata={"gmsa": json.dumps(meta)})
            os.chmod(tmp, 0o644)  # mkstemp files are private
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Compressed:
        """Read a file written by :meth:`save`; a clear error if it is not one or is corrupt."""
        try:
            with safe_open(path, "pt") as handle:
                meta = json.loads((handle.metadata() or {})["gmsa"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            expected = meta.pop(CHECKSUM_KEY)
            soft = [tensors.pop(f"soft.{i}") for i in range(len(meta["rates"]))]
            compressed = cls(soft_tokens=soft, **meta)
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as err:
            raise IncompatibleContextError(f"{path} is not a gmsa compressed-context file ({err})") from err
        if tensors or soft_tokens_sha256(soft) != expected:
            raise IncompatibleContextError(
                f"{path} is corrupt: its soft tokens do not match the checksum recorded when it was written"
            )
        compressed.check_structure(str(path))
        return compressed

    def check_structure(self, source: str = "compressed context") -> None:
        """Raise unless there is one ``(n_i, H)`` tensor, rate and token count per text."""
        sizes = {len(self.soft_tokens), len(self.rates), len(self.n_tokens)}
        if len(sizes) != 1:
            raise IncompatibleContextError(
                f"{source}: {len(self.soft_tokens)} soft-token tensors, {len(self.rates)} rates and "
                f"{len(self.n_tokens)} token counts do not match"
            )
        if any(t.dim() != 2 for t in self.soft_tokens) or len({t.shape[-1] for t in self.soft_tokens}) > 1:
            raise IncompatibleContextError(f"{source}: soft tokens must be (n, H) tensors of one hidden size")

    def check_compatible(self, backbone_fingerprint: str, checkpoint_id: str) -> None:
        """Raise unless these soft tokens were made by the given backbone and checkpoint."""
        if self.backbone_fingerprint != backbone_fingerprint:
            raise IncompatibleContextError(
                f"soft tokens were made for backbone {self.backbone_fingerprint}, "
                f"this model's backbone is {backbone_fingerprint}"
            )
        if self.gmsa_version != __version__:
            raise IncompatibleContextError(
                f"soft tokens were written by gmsa {self.gmsa_version}, this is gmsa {__version__}: "
                "compress the text again"
            )
        if self.checkpoint_id != checkpoint_id:
            raise IncompatibleContextError(
                f"soft tokens were made by GMSA checkpoint {self.checkpoint_id} (gmsa {self.gmsa_version}), "
                f"this model is {checkpoint_id}: compress the text again"
            )
