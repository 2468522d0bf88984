"""LoRA adapters: injection with peft, seeded initialisation, and the standard PEFT adapter directory.

Initialisation is seeded per module name, not by the global RNG, so a node that holds blocks 4-5 creates
exactly the adapter weights a single process holding the whole model creates for those blocks. That is what
makes swarm training comparable with (and, in fp32, equal to) ordinary single-process peft training.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from swarm.config import LoraSpec
from swarm.errors import JobFileError
from swarm.models.blocks import BlockStack
from swarm.models.checkpoint import Checkpoint
from swarm.models.families import ModelFamily, family_of_directory

ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."
CPU = torch.device("cpu")


def peft_config(spec: LoraSpec, base_model_path: str | None = None, family: ModelFamily | None = None) -> LoraConfig:
    """peft's config for the job's LoRA on this model family (read from base_model_path when not given).

    The family decides the default target modules and whether they are transformers' Conv1D (GPT-2), whose
    weights peft must treat as fan-in x fan-out.
    """
    if family is None and base_model_path is not None:
        family = family_of_directory(base_model_path)
    targets = list(spec.target_modules) if family is None else family.lora_target_modules(spec.target_modules)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        fan_in_fan_out=family is not None and family.lora_fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    )


def add_lora(module: torch.nn.Module, spec: LoraSpec, seed: int | str, family: ModelFamily | None = None) -> list[str]:
    """Inject LoRA into `module`'s target linears, freeze everything else; return the adapter's keys.

    The family defaults to the module's own (`BlockStack.family`)."""
    family = family or getattr(module, "family", None)
    config = peft_config(spec, family=family)
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
    for name, param in module.named_parameters():
        param.requires_grad_(".lora_" in name)
    init_lora_weights(module, seed)
    keys = list(adapter_state(module))
    if not keys:
        hint = f"; this {family.model_type} model's default is {list(family.lora_targets)}" if family else ""
        raise JobFileError(f"lora.target_modules {sorted(config.target_modules)} match no module of this model{hint}")
    return keys


def init_lora_weights(module: torch.nn.Module, seed: int | str) -> None:
    """Re-initialise every LoRA pair: A ~ kaiming-uniform (peft's default bound 1/sqrt(fan_in)), B = 0.

    Each A draws from a generator seeded by (seed, module name), independent of process and block placement.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            key = adapter_key(name)
            if key is None:
                continue
            if ".lora_B." in name:
                param.zero_()
                continue
            generator = torch.Generator().manual_seed(_name_seed(seed, key))
            bound = 1.0 / math.sqrt(param.shape[1])
            values = torch.rand(param.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            param.copy_(values.to(param.dtype))


def merge_lora(module: torch.nn.Module) -> None:
    """Add every LoRA pair's delta (scale * B @ A) into its base weight, as peft's merge_and_unload does."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A:
                base = layer.get_base_layer()
                base.weight += layer.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype)


def lora_is_zero(module: torch.nn.Module) -> bool:
    """Whether every LoRA pair adds nothing: all B are zero, as after initialisation."""
    return all(not param.any() for name, param in module.named_parameters() if ".lora_B." in name)


def compute_lora(module: torch.nn.Module, enabled: bool) -> None:
    """Whether `module`'s LoRA layers run their adapter (peft's enable_adapters); disabled, a layer is its base
    layer. peft also sets the adapters' requires_grad here: callers set their own flags after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def _name_seed(seed: int | str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def adapter_key(param_name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.lora_A.default.weight` -> `model.layers.3.self_attn.q_proj.lora_A.weight`."""
    if ".lora_" not in param_name:
        return None
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved names (without the `base_model.model.` prefix)."""
    return {
        key: param
        for name, param in module.named_parameters()
        if (key := adapter_key(name)) is not None
    }


def base_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The non-LoRA parameters under checkpoint names (LoRA wraps `q_proj` as `q_proj.base_layer`)."""
    return {name.replace(".base_layer.", "."): param for name, param in module.named_parameters()
            if ".lora_" not in name}  # fmt: skip


def lora_block_stack(checkpoint: Checkpoint, start: int, end: int, spec: LoraSpec, seed: int | str, dtype: torch.dtype,
                     merged_adapters: list[Path] = (), device: torch.device = CPU) -> torch.nn.Module:
    """Blocks [start, end) of `checkpoint` with the job's LoRA (initialised from `seed`) and the PEFT adapter
    directories `merged_adapters` merged into the base weights in order, as the node merged them.

    The base weights a node's blocks had in a phase, rebuilt from files alone: replay and a resumed coordinator
    both need them. The LoRA tensors are left as the last merge left them; callers load the adapter they need.
    """
    stack = BlockStack(checkpoint, start, end, dtype, device)
    add_lora(stack, spec, seed)
    for directory in merged_adapters:
        load_adapter_state(stack, load_peft_adapter(Path(directory))[1])
        merge_lora(stack)
    return stack


def load_adapter_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = adapter_state(module)
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(tensors[key].to(param.dtype))


def adapter_sha256(tensors: dict[str, torch.Tensor]) -> str:
    from swarm.models.checkpoint import tensors_sha256

    return tensors_sha256(tensors)


def save_peft_adapter(directory: Path, tensors: dict[str, torch.Tensor], spec: LoraSpec, base_model_path: str) -> Path:
    """Write a standard PEFT adapter directory that `PeftModel.from_pretrained(base, directory)` loads."""
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_config(spec, base_model_path)
    config.save_pretrained(str(directory))
    weights = {PEFT_PREFIX + key: tensor.detach().cpu().contiguous() for key, tensor in sorted(tensors.items())}
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def load_peft_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return config, {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
