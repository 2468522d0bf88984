"""Partial reads of a local Hugging Face checkpoint directory: only the tensors a process needs.

A node reads the tensors of its block range and nothing else (memory proportional to its shard); the
trainer reads embeddings, final norm and LM head. Both go through `Checkpoint.load`, which opens each
safetensors file lazily and copies only the requested tensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from swarm.block_range import BlockRange
from swarm.config import ModelSpec
from swarm.errors import ModelSourceError
from swarm.models.families import ModelFamily, family_of
from swarm.models.presets import materialize_preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Checkpoint:
    path: Path
    config: object
    family: ModelFamily
    weight_map: dict[str, Path]  # tensor name (as in the causal-LM class) -> safetensors file holding it
    stored_names: dict[str, str] = field(default_factory=dict)  # tensor name -> its name in that file

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: not a checkpoint directory (no config.json)")
        try:
            config = AutoConfig.from_pretrained(path)
        except (ValueError, OSError, KeyError) as error:
            raise ModelSourceError(f"{path}: cannot read config.json: {error}") from None
        family = family_of(config)
        config._attn_implementation = "sdpa"
        stored = _weight_map(path)
        names = _canonical_names(family, stored)
        return cls(path, config, family, {name: stored[names[name]] for name in names}, names)

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_parameters(self) -> int:
        """Parameters stored in the checkpoint, read from the safetensors headers (no tensor is loaded);
        stale buffers that some checkpoints keep in their blocks are not parameters and are not counted."""
        return self._count(list(self.weight_map))

    def block_parameters(self, start: int, end: int) -> int:
        """Parameters of blocks [start, end), counted as `num_parameters` counts them."""
        return self._count(self.block_tensor_names(start, end))

    def _count(self, names: list[str]) -> int:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if not self.family.is_stale_tensor(name):
                by_file.setdefault(self.weight_map[name], []).append(self.stored_names.get(name, name))
        total = 0
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    count = 1
                    for size in handle.get_slice(name).get_shape():
                        count *= size
                    total += count
        return total

    def block_tensor_names(self, start: int, end: int) -> list[str]:
        names = [name for name in self.weight_map
                 if any(self.family.is_block_tensor(name, index) for index in range(start, end))]
        if not names:
            raise ModelSourceError(f"{self.path}: no tensors for blocks {BlockRange(start, end)}")
        return sorted(names)

    def trainer_tensor_names(self) -> dict[str, str]:
        """Role -> tensor name for the trainer's parts ("embed", "positions", "norm", "norm_bias", "head");
        a tied LM head reads the embedding matrix (checkpoints of tied models often store no head)."""
        family = self.family
        head = family.head_name
        if head not in self.weight_map:
            if not getattr(self.config, "tie_word_embeddings", False):
                raise ModelSourceError(f"{self.path}: checkpoint has no {head} and does not tie embeddings")
            head = family.embed_name
        norm = family.norm_tensor_names()
        names = {"embed": family.embed_name, "norm": norm["weight"], "head": head}
        if "bias" in norm:
            names["norm_bias"] = norm["bias"]
        if family.position_embed_name is not None:
            names["positions"] = family.position_embed_name
        missing = [name for name in names.values() if name not in self.weight_map]
        if missing:
            raise ModelSourceError(f"{self.path}: checkpoint lacks {', '.join(missing)}")
        return names

    def load(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Read exactly `names` from the safetensors files, converting floating tensors to dtype."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise ModelSourceError(f"{self.path}: tensor {name} not found in the checkpoint")
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in file_names:
                        tensor = handle.get_tensor(self.stored_names.get(name, name))
                        tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            except (OSError, RuntimeError) as error:
                raise ModelSourceError(f"{file}: cannot read safetensors file: {error}") from None
        return tensors


def _weight_map(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise ModelSourceError(f"{index}: malformed safetensors index ({error})") from None
        return {name: path / file for name, file in mapping.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}
    if any(path.glob("*.bin")):
        raise ModelSourceError(
            f"{path}: only PyTorch .bin weights found; convert the checkpoint to safetensors "
            "(model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ModelSourceError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _canonical_names(family: ModelFamily, stored: dict[str, Path]) -> dict[str, str]:
    """Name in the causal-LM class -> name in the files. Checkpoints saved from the bare base model (the
    released GPT-2 files: `h.0.attn...`, `wte.weight`) lack the base prefix; they get it back here."""
    if family.embed_name in stored or family.embed_name.removeprefix(family.base_prefix) not in stored:
        return {name: name for name in stored}
    return {(name if name == family.head_name else family.base_prefix + name): name for name in stored}


def resolve_model(spec: ModelSpec, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory for a job's model: a materialized preset or the given local directory."""
    if spec.preset is not None:
        return materialize_preset(spec.preset, spec.seed, cache_dir)
    if not spec.path.is_dir():
        raise ModelSourceError(f"model.path {spec.path} is not a directory on this machine")
    return spec.path


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Order-independent content hash of named tensors (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # hashed in place, not copied to bytes first
    return digest.hexdigest()
