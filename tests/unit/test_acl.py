"""The ACL users' rules and `taskmux redis-acl`; tests/integration/test_redis_security.py applies them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from router.acl import (
    ADMIN,
    GATEWAY,
    HA_USERS,
    KEDA,
    USERS,
    WORKER,
    aclfile_line,
    default_user_aclfile_line,
    setuser_args,
)
from taskmux.cli import main


def test_users_start_from_nothing_and_stay_under_the_prefix() -> None:
    for user in (GATEWAY, WORKER, KEDA):
        rules = user.rules(">pw")
        assert rules[:5] == ["reset", "on", ">pw", "resetchannels", "-@all"]
        patterns = [k for g in user.grants for k in g.keys]
        assert all(k.lstrip("%RW").startswith("~taskmux:v1:") for k in patterns), patterns
        assert not any("@" in c for g in user.grants for c in g.commands)  # no categories
        assert not user.patterns  # every key pattern inside a selector


def test_keda_only_reads_job_streams() -> None:
    (grant,) = KEDA.grants
    assert set(grant.commands) == {"xinfo|groups", "xpending", "xlen"}
    assert grant.keys == ("%R~taskmux:v1:tasks:*",)
    assert set(KEDA.keyless) == {"ping", "info"}


def test_only_the_admin_has_every_command_and_key() -> None:
    assert ADMIN.rules("#h")[-3:] == ["+@all", "~*", "&*"]
    assert [u for u in USERS if "@all" in u.keyless] == [ADMIN]


def test_the_worker_cannot_enqueue_jobs() -> None:
    xadd = [g for g in WORKER.grants if "xadd" in g.commands]
    assert xadd and all("~taskmux:v1:tasks:*" not in g.keys for g in xadd)


def test_cli_prints_hashes_never_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "gateway-password"
    secret.write_text("correct horse\n")
    assert main(["redis-acl", "--format", "aclfile", "--gateway-password-file", str(secret)]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_user = {line.split()[1]: line for line in lines}
    assert list(by_user) == [*(u.name for u in USERS), "default"]
    digest = hashlib.sha256(b"correct horse").hexdigest()
    assert by_user[GATEWAY.name] == aclfile_line(GATEWAY, f"#{digest}")
    assert "correct horse" not in by_user[GATEWAY.name]
    for user in (WORKER, KEDA, ADMIN):
        assert "#<sha256-of-password>" in by_user[user.name]  # a placeholder Redis refuses
    assert lines[-1] == default_user_aclfile_line() == "user default off"


def test_cli_takes_a_password_file_per_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["redis-acl", "--format", "aclfile"]
    for user in USERS:
        path = tmp_path / user.name
        path.write_text(f"pw-{user.name}")
        args += [f"--{user.name.removeprefix('taskmux-')}-password-file", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "<sha256-of-password>" not in out
    for user in USERS:
        digest = hashlib.sha256(f"pw-{user.name}".encode()).hexdigest()
        assert aclfile_line(user, f"#{digest}") in out.splitlines()


def test_cli_setuser_lines_are_shell_quoted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["redis-acl"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("ACL SETUSER taskmux-gateway reset on '#<sha256-of-password>'")
    assert "'(+evalsha +xlen +xadd ~taskmux:v1:tasks:*)'" in first
    assert setuser_args(GATEWAY, ">x")[:2] == ["SETUSER", "taskmux-gateway"]


def test_cli_setuser_turns_the_default_user_off_last(capsys: pytest.CaptureFixture[str]) -> None:
    # Last, so that a redis-cli logged in as default has run every other line.
    assert main(["redis-acl"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ACL SETUSER default reset off"


def test_readme_shows_the_users_as_the_cli_prints_them() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for user in USERS:
        assert aclfile_line(user, "#<sha256-of-password>") in readme
    assert default_user_aclfile_line() in readme


def test_the_k8s_readme_lists_the_ha_users_commands_as_granted() -> None:
    readme = (Path(__file__).resolve().parents[2] / "k8s" / "README.md").read_text("utf-8")
    for user in HA_USERS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{user.name}` |"))
        listed = row.split("`")[3].replace("\\|", "|").split()
        assert listed == [f"+{command}" for command in user.keyless], user.name


def test_cli_adds_the_replication_and_sentinel_users_only_with_ha(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["redis-acl", "--format", "aclfile"]) == 0
    plain = capsys.readouterr().out
    assert "taskmux-replica" not in plain and "taskmux-sentinel" not in plain
    secret = tmp_path / "replica"
    secret.write_text("r3plica-secret\n", encoding="utf-8")
    args = ["redis-acl", "--format", "aclfile", "--ha", "--replica-password-file", str(secret)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    replica = next(line for line in lines if line.startswith("user taskmux-replica "))
    digest = hashlib.sha256(b"r3plica-secret").hexdigest()
    assert digest in replica and "r3plica-secret" not in replica
    assert "+psync" in replica and "~" not in replica  # replication only, no keys
    assert any(line.startswith("user taskmux-sentinel ") for line in lines)
    assert lines[-1] == "user default off"
