"""Start-up validation: a bad webhook allow-list or port is one config-error line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.cli.main import main


@pytest.mark.parametrize("table", ['allow_list = ["10.0.0.0/99"]', 'allow_list = ["a b"]',
                                   'allowed_ports = ["0"]', 'denied_ports = ["99999"]'])
def test_run_refuses_a_bad_webhook_guard_before_any_io(tmp_path: Path, table: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Issue 13 §2: a malformed allow_list entry was a ValueError traceback at start."""
    cfg = tmp_path / "hostagent.toml"
    cfg.write_text(f'[collector]\nstate_path = "{tmp_path / "state.db"}"\n'
                   f'[[sinks]]\ntype = "webhook"\n{table}\n')
    assert main(["run", "--once", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hostagent: config error: {cfg}: [sinks[0].")
    assert "fix:" in err[0] or "expected" in err[0]
    assert not (tmp_path / "state.db").exists()
