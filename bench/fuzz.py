"""Fuzz the live gateway from its own OpenAPI document: 0 server errors, 0 schema violations.

Starts a real `moi serve` on loopback (API key on, a 512-token context so that a fuzzed
`max_tokens` cannot keep the 2 cores busy for minutes) and runs schemathesis against its
`/openapi.json` with every check: server errors, response schema and content-type conformance,
status codes the document does not list, bad data accepted, good data refused. Bounded by
examples per operation and a time budget; deterministic generation makes a run repeatable.
The upload routes skip one check, "schema-valid data is accepted": no JSON Schema can say
"these bytes are audio", and random bytes rightly get a 400. Prints schemathesis' summaries
(cases run, failures) and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from _common import ROOT, start_server

KEY = "fuzz-key"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=25, help="cases per operation and phase")
    ap.add_argument("--max-time", type=int, default=600, help="seconds for the whole run")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    server, url = start_server("--api-key", KEY, env={"MOI_LLM_CONTEXT": "512"})
    try:
        common = ["st", "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {KEY}",
                  "--max-examples", str(args.max_examples), "--max-time", str(args.max_time // 2),
                  "--request-timeout", "300", "--max-response-time", "300", "--workers", "1",
                  "--generation-deterministic", "--no-shrink"]
        # JSON routes: every check. Upload routes: every check but "schema-valid data is accepted":
        # no JSON Schema can say "this binary is audio", and random bytes rightly get a 400.
        runs = [
            [*common, "--checks", "all", "--exclude-path-regex", "transcriptions|turn"],
            [*common, "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--include-path-regex", "transcriptions|turn"],
        ]
        code = max(subprocess.run(cmd, cwd=ROOT).returncode for cmd in runs)
    finally:
        server.kill()
        server.wait()
    sys.exit(code)


if __name__ == "__main__":
    main()
