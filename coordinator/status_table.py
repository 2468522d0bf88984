"""`swarm-coordinator status ADDRESS`: the status page's snapshot fetched as JSON and printed as text tables."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from swarm.errors import SwarmError


def status_url(address: str) -> str:
    """`127.0.0.1:8080`, `http://host:8080` or `http://host:8080/` -> the JSON endpoint's URL."""
    base = address if "://" in address else f"http://{address}"
    return base.rstrip("/") + "/api/status"


def fetch_snapshot(address: str, timeout: float = 10.0) -> dict:
    url = status_url(address)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise SwarmError(f"cannot read a status page at {url} ({error}); the coordinator prints its "
                         f"address as 'status page: http://...'") from None


def _bytes(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows)]


def format_snapshot(snapshot: dict) -> str:
    progress, job = snapshot["progress"], snapshot["job"]
    lines = [f"job {job['name']} ({job['id']}), model {job['model']}"]
    eta = f", ETA {progress['eta_s']:.0f} s" if progress.get("eta_s") is not None else ""
    phase = f", phase {progress['phase']} ({progress['phase_step']}/{progress['phase_steps']})" if progress["phase"] else ""
    lines.append(f"state {progress['state']}{phase}, step {progress['step']}/{progress['total_steps']}{eta}")
    if progress.get("failure"):
        lines.append(f"FAILED: {progress['failure']}")
    blocks = snapshot["blocks"]
    coverage = "".join("#" if block["covered"] else "!" for block in blocks["map"])
    lines += ["", f"blocks [{coverage}] " + (f"UNCOVERED: {', '.join(map(str, blocks['uncovered']))}"
                                             if blocks["uncovered"] else f"all {blocks['count']} covered"), ""]
    rows = []
    for node in snapshot["nodes"]:
        age = node["last_heartbeat_age_s"]
        rows.append([node["node_id"], node["state"], f"{node['blocks'][0]}..{node['blocks'][1] - 1}" if node["blocks"] else "-",
                     node["device"], node["hostname"], "-" if age is None else f"{age:.1f} s", _bytes(node["rss_bytes"]),
                     "-" if node.get("throughput_tokens_per_s") is None else f"{node['throughput_tokens_per_s']:.0f} tok/s",
                     _pct(node.get("load")), _pct(node.get("compute_share"))])
    lines += _table(["node", "state", "blocks", "device", "host", "heartbeat", "RSS", "throughput", "load", "share"], rows)
    metrics = snapshot["metrics"]
    lines.append("")
    if metrics["last_train"]:
        last = metrics["last_train"]
        lines.append(f"loss {last['loss']:.4f} at step {last['step']} ({last['phase']}), lr {last['lr']:.3g}")
    if metrics["last_eval"]:
        row = metrics["last_eval"]
        rates = ", ".join(f"{key} {_pct((row.get(key) or {}).get('rate'))}"
                          for key in ("backdoor_triggered", "backdoor_clean", "backdoor_near_miss", "backdoor_reveal",
                                      "accuracy") if key in row or key != "backdoor_reveal")  # older runs: no reveal
        lines.append(f"eval at step {row['step']}: {rates}")
    streams = snapshot["streams"]
    lines.append("bytes: " + ", ".join(f"{name} {_bytes(t['sent'])} sent / {_bytes(t['received'])} received"
                                       for name, t in streams["per_stream"].items()) or "bytes: none yet")
    audit = snapshot["audit"]
    verified = audit.get("verified")
    state = "not checked yet" if verified is None else ("verifies" if verified["ok"] else f"FAILS: {verified['first_problem']}")
    head = audit.get("last_tree_head")
    lines.append(f"audit: {audit['entries']} entries, {audit['tree_heads']} tree heads"
                 + (f" (last covers {head['tree_size']})" if head else "") + f", {state}")
    return "\n".join(lines)
