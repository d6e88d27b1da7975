"""schemathesis fuzzes every operation of /openapi.json: no 5xx, no schema violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hostagent.api.view import ApiView
from hostagent.clock import SystemClock
from tests.api.support import ALICE, BOB, Keys, api_config, report, start_server

ST = shutil.which("st") or str(Path(sys.executable).with_name("st"))
EXAMPLES = os.environ.get("HOSTAGENT_ST_EXAMPLES", "30")
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.mark.skipif(not Path(ST).exists(), reason="schemathesis not installed")
@pytest.mark.parametrize("who", ["admin", "read"])
async def test_schemathesis_finds_nothing(nursery: trio.Nursery, keys: Keys,
                                          tmp_path: Path, who: str) -> None:
    view = ApiView()
    rep = report({f"i-{n}": (ALICE if n % 2 else BOB) for n in range(6)})
    rep.started_wall_ns = SystemClock().now().wall_ns  # fresh: health answers 200, not 503
    view.update(rep)
    cfg = api_config(keys, rate_per_address_s=100000.0, burst_per_address=100000,
                     rate_per_principal_s=100000.0, burst_per_principal=100000)
    srv = await start_server(nursery, cfg, view)
    # Every check, stateful links included, over the REAL stores (support.start_server: state
    # file and a writable rules file in a temp dir). Excluded: `ignored_auth` would flag the
    # open routes (/health, /openapi.json); `missing_required_header` the X-API-Key we pass.
    # positive_data_acceptance runs: the documented 400s are listed in schemathesis.toml.
    cmd = [ST, "--config-file", str(CONFIG), "run", f"{srv.url}/openapi.json",
           "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
           "--exclude-checks", "ignored_auth,missing_required_header",
           "-H", f"X-API-Key: {keys.admin_key if who == 'admin' else keys.read_key}",
           "-n", EXAMPLES, "--seed", "1",
           "--request-timeout", "10", "--no-color", "--suppress-health-check", "all",
           "--report-dir", str(tmp_path)]
    proc = await trio.run_process(cmd, capture_stdout=True, stderr=subprocess.STDOUT,
                                  check=False)
    srv.stop.set()
    out = proc.stdout.decode(errors="replace")
    print(out)  # the whole report, shown when the test fails
    assert proc.returncode == 0, out[-6000:]
