"""`python -m bench [--quick] [--repeats N] [--only SCENARIO ...] [--output DIR]`, from the repository root.

Writes `<output>/<date>-<host>.json` and `.md` (default output: bench/results; with --quick, file names start with
`quick-`) and prints the table. Exits 1 if any figure failed; a figure whose feature is not wired yet is reported
as unavailable and does not fail the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

from bench.harness import ROOT, FigureError, Unavailable
from bench.report import AGAINST, FIGURES, aggregate, machine, markdown
from bench.scenarios import FOREIGN_SCENARIOS, FULL, QUICK, SCENARIOS


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh nvdp processes per scenario "
                        f"(default {FULL.repeats}, quick {QUICK.repeats})")
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in SCENARIOS], metavar="SCENARIO",
                        help=f"run only these scenarios: {', '.join(name for name, _ in SCENARIOS)}")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results", help="where results go")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each scenario's progress")
    parser.add_argument("--against", type=Path, default=None, metavar="PATH",
                        help="also run NVIDIA's Go plugin binary at PATH through the scenarios "
                             f"{', '.join(FOREIGN_SCENARIOS)}, in alternating order, and report nvdp/Go ratios "
                             "(needs root for a private mount namespace: bench/against.py)")
    args = parser.parse_args(argv)
    if args.against is not None:
        args.against = args.against.resolve()
        if not (args.against.is_file() and os.access(args.against, os.X_OK)):
            parser.error(f"--against {args.against}: not an executable file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    params = QUICK if args.quick else FULL
    if args.repeats is not None:
        params = replace(params, repeats=max(1, args.repeats))
    scenarios = [(n, f) for n, f in SCENARIOS if not args.only or n in args.only]
    collected: dict[str, list[dict[str, float | str] | Unavailable | str]] = {}
    skip: set[str] = set()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nvdp-bench-") as tmp:
        for repeat in range(params.repeats):
            for name, scenario in scenarios:
                # nvdp, and with --against the foreign plugin, in alternating order from one round to the next.
                runs: list[tuple[str, Path | None]] = [("", None)]
                if args.against is not None and name in FOREIGN_SCENARIOS:
                    runs.append((AGAINST, args.against))
                if repeat % 2:
                    runs.reverse()
                for prefix, binary in runs:
                    if prefix + name in skip:
                        continue
                    workdir = Path(tmp) / f"{name}-{repeat}{'-against' if prefix else ''}"
                    workdir.mkdir()
                    started = time.monotonic()
                    try:
                        results = scenario(params, workdir, against=binary) if binary else scenario(params, workdir)
                    except Unavailable as exc:
                        results = {f"{prefix}{name}": exc}
                    except FigureError as exc:
                        results = {f"{name}": f"{exc}"}
                    except Exception as exc:  # a crash in the harness is a failed figure too, with its traceback
                        results = {f"{name}": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
                    for key, value in results.items():
                        collected.setdefault(key if key.startswith(AGAINST) else prefix + key, []).append(value)
                    if results and all(isinstance(v, Unavailable) for v in results.values()):
                        skip.add(prefix + name)  # nothing to repeat
                    if args.verbose:
                        print(f"[{repeat + 1}/{params.repeats}] {prefix}{name}: {time.monotonic() - started:.1f} s",
                              file=sys.stderr)
    figures = {}
    for key in FIGURES:
        for prefixed in (key, AGAINST + key):
            if prefixed in collected:
                figures[prefixed] = aggregate(prefixed, collected[prefixed])
    # A scenario that failed as a whole is reported under its own name.
    for key, values in collected.items():
        if key.removeprefix(AGAINST) not in FIGURES:
            errors = [v for v in values if isinstance(v, str)]
            unavailable = [v for v in values if isinstance(v, Unavailable)]
            if errors or not unavailable:
                figures[key] = {"title": f"scenario {key}", "unit": "", "status": "error",
                                "reason": errors[0] if errors else "?"}
            else:  # a whole foreign run that cannot happen here (no root, say): said, not failed
                figures[key] = {"title": f"scenario {key}", "unit": "", "status": "unavailable",
                                "reason": str(unavailable[0])}
    now = datetime.datetime.now(datetime.UTC)
    result = {
        "schema": 1,
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": "quick" if args.quick else "full",
        "repeats": params.repeats,
        "params": params.__dict__,
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "elapsed_s": time.monotonic() - began,
        "machine": machine(),
        "against": str(args.against) if args.against else None,
        "figures": figures,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"{'quick-' if args.quick else ''}{now.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    json_path = args.output / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.output / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    failed = [k for k, v in figures.items() if v["status"] == "error"]
    if failed:
        for key in failed:
            print(f"FAILED {key}: {figures[key]['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
