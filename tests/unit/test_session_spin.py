"""ONNX Runtime's spinning settings: what each pair of worker settings asks of a session."""

from __future__ import annotations

import pytest

from model.encoder import _session_options

SPIN = "session.intra_op.allow_spinning"
STOP = "session.force_spinning_stop"


@pytest.mark.parametrize(
    ("spin", "in_run", "allow", "stop"),
    [
        (False, False, "0", ""),  # threads sleep whenever they wait
        (False, True, "1", "1"),  # spin within a run, stop as soon as it returns
        (True, False, "1", ""),  # ONNX Runtime's default: spin between runs too
        (True, True, "1", ""),  # spinning between runs wins: nothing to stop
    ],
)
def test_spinning_entries(spin: bool, in_run: bool, allow: str, stop: str) -> None:
    options = _session_options(2, spin, in_run)
    assert options.get_session_config_entry(SPIN) == allow
    if stop:
        assert options.get_session_config_entry(STOP) == stop
    else:
        with pytest.raises(RuntimeError):
            options.get_session_config_entry(STOP)
