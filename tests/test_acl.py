"""The ACL users' rules and `taskmux redis-acl`; tests/test_redis_security.py applies them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from router.acl import GATEWAY, WORKER, aclfile_line, setuser_args
from taskmux.cli import main


def test_users_start_from_nothing_and_stay_under_the_prefix() -> None:
    for user in (GATEWAY, WORKER):
        rules = user.rules(">pw")
        assert rules[:5] == ["reset", "on", ">pw", "resetchannels", "-@all"]
        patterns = [k for g in user.grants for k in g.keys]
        assert all(k.lstrip("%RW").startswith("~taskmux:v1:") for k in patterns), patterns
        assert not any("@" in c for g in user.grants for c in g.commands)  # no categories


def test_the_worker_cannot_enqueue_jobs() -> None:
    xadd = [g for g in WORKER.grants if "xadd" in g.commands]
    assert xadd and all("~taskmux:v1:tasks:*" not in g.keys for g in xadd)


def test_cli_prints_hashes_never_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "gateway-password"
    secret.write_text("correct horse\n")
    assert main(["redis-acl", "--format", "aclfile", "--gateway-password-file", str(secret)]) == 0
    gateway_line, worker_line = capsys.readouterr().out.splitlines()
    digest = hashlib.sha256(b"correct horse").hexdigest()
    assert gateway_line == aclfile_line(GATEWAY, f"#{digest}")
    assert "correct horse" not in gateway_line
    assert "#<sha256-of-password>" in worker_line  # a placeholder Redis refuses


def test_cli_setuser_lines_are_shell_quoted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["redis-acl"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("ACL SETUSER taskmux-gateway reset on '#<sha256-of-password>'")
    assert "'(+evalsha +xlen +xadd ~taskmux:v1:tasks:*)'" in first
    assert setuser_args(GATEWAY, ">x")[:2] == ["SETUSER", "taskmux-gateway"]


def test_readme_shows_the_users_as_the_cli_prints_them() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for user in (GATEWAY, WORKER):
        assert aclfile_line(user, "#<sha256-of-password>") in readme
