"""The big schemathesis run: every operation of the API, many generated requests each.

    .venv/bin/python bench/fuzz.py [--examples 200] [--seed N] [--out bench/results/fuzz.md]

Starts the real API the way the tests do (tests/stack.py: uvicorn, PostgreSQL on
127.0.0.1:5432, Redis on 127.0.0.1:6379, a database and queue names of its own), creates a
tenant key and real objects (a ready dataset and model, a queued and a succeeded job with an
artifact), then for every operation of /openapi.json and both generation modes (positive:
valid requests, negative: invalid ones) sends --examples generated requests, authenticated,
once with generated ids and, for operations with ids in the path or a body, once with the real
ones (and upload file names the routes accept). Every response is
checked as in tests/test_fuzz.py (no 5xx, status code, content type, headers and body conform
to the schema, error bodies included). Prints a table (operation, mode, ids, examples run,
statuses seen, failures) and each distinct failure with a curl command to reproduce it; writes
the table to --out. Exits 1 if anything failed.

The same checks from the schemathesis CLI, against an API you started yourself:

    .venv/bin/st run http://127.0.0.1:8000/openapi.json -H "Authorization: Bearer $KEY" \\
        --checks not_a_server_error,status_code_conformance,content_type_conformance,\\
response_headers_conformance,response_schema_conformance --max-examples 200
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' own modules, as pytest imports them

from hypothesis import seed as hypothesis_seed  # noqa: E402

from stack import Stack  # noqa: E402
from test_fuzz import MODES, fuzz_operation, load_schema, operations, real_objects, takes_ids  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="Generated requests per operation, mode and id kind.")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.md")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp), MASKTUNE_MAX_UPLOAD_BYTES=str(1 << 20), MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT="50")
        try:
            stack.start_api()
            key = stack.create_key("fuzzer")
            ids = real_objects(stack, key)
            schema = load_schema(stack.base_url)
            outcomes = []
            started = time.monotonic()
            for operation in operations(schema):
                for mode in MODES:
                    for real in ((False, True) if takes_ids(operation) else (False,)):
                        run = hypothesis_seed(seed)(fuzz_operation)
                        outcome = run(operation, stack.base_url, key, mode=mode, examples=args.examples,
                                      real_ids=ids if real else None, derandomize=False)
                        outcomes.append(outcome)
                        print(f"  {outcome.operation:42} {outcome.mode:8} {outcome.ids:9} {outcome.examples:5} "
                              f"examples, {len(outcome.failures)} failures", flush=True)
            elapsed = time.monotonic() - started
            server_errors = stack.log_tail("api", 200_000).count("unhandled error")
        finally:
            stack.close()

    rows = ["| operation | mode | ids | examples | statuses | failures |", "|---|---|---|---:|---|---:|"]
    for o in outcomes:
        statuses = ", ".join(f"{code}×{n}" for code, n in sorted(o.statuses.items()))
        rows.append(f"| `{o.operation}` | {o.mode} | {o.ids} | {o.examples} | {statuses} | {len(o.failures)} |")
    total_examples = sum(o.examples for o in outcomes)
    total_failures = sum(len(o.failures) for o in outcomes)
    rows.append(f"| **all {len({o.operation for o in outcomes})} operations** | | | **{total_examples}** | "
                f"| **{total_failures}** |")
    summary = (f"schemathesis {__import__('schemathesis').__version__}, seed {seed}, --examples {args.examples}, "
               f"{elapsed:.0f} s; unhandled errors in the API log: {server_errors}")
    table = "\n".join(rows)
    print(f"\n{table}\n\n{summary}")
    for o in outcomes:
        for name, curl in o.failures.items():
            print(f"\nFAILED {o.operation} [{o.mode}, {o.ids} ids] {name}\n  {curl[:3000]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Fuzzing the API (bench/fuzz.py)\n\n{summary}\n\n{table}\n")
    return 1 if total_failures or server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
