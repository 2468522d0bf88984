"""`swarm-coordinator estimate`'s flags (strings, as argparse keeps them) to the estimator's typed inputs."""

from __future__ import annotations

from swarm.estimate.errors import EstimateInputError, ModelShapeError
from swarm.estimate.inputs import NodeSpec, Workload
from swarm.estimate.shape import LLAMA_HEAD_DIM, LLAMA_VOCAB, LORA_TARGETS, ModelShape, llama_intermediate, llama_shape
from swarm.estimate.units import parse_bandwidth, parse_bytes, parse_count, parse_fraction, parse_int, parse_number

FLAG_DEFAULTS = {
    "lora_rank": "8", "lora_targets": ",".join(LORA_TARGETS), "seq": "512", "tokens": "2e7", "micro_batch": "1",
    "batch": "32", "node_mem": "24GiB", "reserve": "1GiB", "node_tflops": "70", "efficiency": "0.4",
    "link": "100Mbit", "latency_ms": "50", "volunteers": "16",
}


def inputs_from_flags(flags: dict) -> tuple[ModelShape, Workload, NodeSpec]:
    """Command-line strings (keyed by argparse dest; None = not given) -> typed inputs; errors name the flag."""
    f = {**FLAG_DEFAULTS, **{key: value for key, value in flags.items() if value is not None}}
    if sum(f.get(key) is not None for key in ("params", "preset", "layers")) != 1:
        raise ModelShapeError("give exactly one of --params, --preset, or --layers with --hidden")
    vocab = parse_int(f.get("vocab") or LLAMA_VOCAB, "--vocab")
    if f.get("preset") is not None:
        from swarm.models.presets import PRESETS  # imports torch: only when asked for

        llama = sorted(name for name, preset in PRESETS.items() if preset.family == "llama")
        if f["preset"] not in llama:  # the estimator's arithmetic is a Llama decoder's
            raise ModelShapeError(f"--preset {f['preset']!r}: choose one of {', '.join(llama)}")
        shape = ModelShape.from_preset(PRESETS[f["preset"]])
    elif f.get("params") is not None:
        shape = llama_shape(parse_count(f["params"], "--params"), vocab)
    else:
        if f.get("hidden") is None:
            raise ModelShapeError("--layers needs --hidden (and optionally --intermediate, --heads, --kv-heads)")
        hidden = parse_int(f["hidden"], "--hidden")
        heads = parse_int(f["heads"], "--heads") if f.get("heads") else max(1, hidden // LLAMA_HEAD_DIM)
        shape = ModelShape(parse_int(f["layers"], "--layers"), hidden,
                           parse_int(f["intermediate"], "--intermediate") if f.get("intermediate")
                           else llama_intermediate(hidden),
                           heads, parse_int(f["kv_heads"], "--kv-heads") if f.get("kv_heads") else heads, vocab)
    targets = tuple(target.strip() for target in f["lora_targets"].split(",") if target.strip())
    if not targets or any(target not in LORA_TARGETS for target in targets):
        raise EstimateInputError(f"--lora-targets {f['lora_targets']!r}: a comma-separated subset of "
                                 f"{','.join(LORA_TARGETS)}")
    work = Workload(parse_int(f["lora_rank"], "--lora-rank"), targets, parse_int(f["seq"], "--seq"),
                    parse_count(f["tokens"], "--tokens"), parse_int(f["micro_batch"], "--micro-batch"),
                    parse_int(f["batch"], "--batch"), bool(f.get("recompute")))
    if work.batch % work.micro_batch:
        raise EstimateInputError(f"--batch {work.batch} must be a multiple of --micro-batch {work.micro_batch}")
    node = NodeSpec(parse_bytes(f["node_mem"], "--node-mem"), parse_count(f["node_tflops"], "--node-tflops"),
                    parse_fraction(f["efficiency"], "--efficiency"), parse_bandwidth(f["link"], "--link"),
                    parse_number(f["latency_ms"], "--latency-ms", exclusive=False) / 1e3,
                    parse_int(f["volunteers"], "--volunteers"), parse_bytes(f["reserve"], "--reserve"))
    if node.reserved_bytes >= node.memory_bytes:
        raise EstimateInputError(f"--reserve {f['reserve']} leaves nothing of --node-mem {f['node_mem']}")
    return shape, work, node
