"""One validated configuration per process (docs/configuration.md): each setting declared once
(``services.core.config``), read from flags, then ``$SHARDREC_*``, then the ``--config`` TOML
file, then its default; checked at start naming the setting and the source; ``config show``
prints the effective settings with their sources, secrets masked."""

from __future__ import annotations

import dataclasses

import pytest

from services.admin.cli import build_parser, main
from services.core.config import (
    FRONTEND_SETTINGS,
    SHARD_SETTINGS,
    FrontendConfig,
    ShardConfig,
    ZkConfig,
    frontend_config,
    shard_config,
)
from services.core.errors import ConfigError
from services.core.rpc.server import keepalive_options


def frontend(argv=(), env=None, **_):
    args = build_parser().parse_args(["frontend", "serve", *argv])
    r = FRONTEND_SETTINGS.resolve(args, env or {})
    return r, frontend_config(r)


def shard(argv=("--node-id", "s0"), env=None):
    args = build_parser().parse_args(["shard", "serve", *argv])
    r = SHARD_SETTINGS.resolve(args, env or {})
    return r, shard_config(r)


def test_defaults_are_the_configs_own_and_every_setting_is_declared_once():
    r, config = frontend()
    assert config == FrontendConfig(frontend_id=config.frontend_id, zk=ZkConfig()) and config.frontend_id.startswith("frontend-")
    assert set(r.sources.values()) == {"default"}
    assert shard()[1] == ShardConfig("s0", ZkConfig())
    for table in (FRONTEND_SETTINGS, SHARD_SETTINGS):
        names = [s.name for s in table.settings]
        assert len(names) == len(set(names)) and all(s.help for s in table.settings)
        assert all(s.env == "SHARDREC_" + s.name.upper() for s in table.settings)
        assert all(s.flag == "--" + s.name.replace("_", "-") for s in table.settings if not s.secret)


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path):
    conf = tmp_path / "shardrec.toml"
    conf.write_text('cluster = "c1"\ngrace_s = 3\n[frontend]\nmax_queue = 10\nmax_batch = 20\nredis_timeout_ms = 30\nmax_wait_ms = 7\n'
                    '[shard]\nrpc_threads = 99\ngrace_s = 4\n')  # fmt: skip
    env = {"SHARDREC_MAX_BATCH": "21", "SHARDREC_REDIS_TIMEOUT_MS": "31", "SHARDREC_ADMISSION": "off", "SHARDREC_UNRELATED": "x"}
    r, c = frontend(["--config", str(conf), "--redis-timeout-ms", "32"], env)
    assert (c.max_queue, c.max_batch, c.redis_timeout_s, c.max_wait_s, c.admission) == (10, 21, 0.032, 0.007, False)
    assert (c.zk.cluster, c.grace_s) == ("c1", 3.0)
    assert r.sources["max_queue"] == f"file {conf}" and r.sources["max_batch"] == "env SHARDREC_MAX_BATCH"
    assert r.sources["redis_timeout_ms"] == "flag --redis-timeout-ms" and r.sources["eject_s"] == "default"
    r, c = shard(["--node-id", "s1"], {"SHARDREC_CONFIG": str(conf)})  # its own table over the top level
    assert (c.rpc_threads, c.grace_s, c.zk.cluster) == (99, 4.0, "c1") and r.sources["rpc_threads"] == f"file {conf}"
    conf.write_text("max_queue = 10\n")  # a frontend's key at the top level: not for a shard
    with pytest.raises(ConfigError, match=r"'max_queue' is not a setting of shard serve \(.*\[shard\]\)"):
        shard(["--node-id", "s1", "--config", str(conf)])


def test_every_old_spelling_and_kind_of_value_still_works(tmp_path):
    _, c = frontend(["--inproc", "--checkpoint", "/m", "--hedge-delay-ms", "p95", "--feature-sync", "off", "--http-port", "0"])
    assert (c.lookup, c.inproc_checkpoint, c.zk, c.hedge_delay_s, c.feature_sync, c.http_port) == ("inproc", "/m", None, None, False, 0)
    _, c = frontend(["--hedge-delay-ms", "7", "--lookup", "redis-kv", "--checkpoint", "/m", "--redis", "redis://r:1/0"])
    assert (c.hedge_delay_s, c.kv_redis_url, c.checkpoint) == (0.007, "redis://r:1/0", "/m")
    _, s = shard(["--node-id", "s2", "--no-verify", "--max-ids", "5", "--frontend-cert-names", "a, b"])
    assert (s.verify_checksums, s.max_ids_per_request, s.auth.frontend_names) == (False, 5, ("a", "b"))
    _, s = shard((), env={"SHARDREC_NODE_ID": "s3", "SHARDREC_NO_VERIFY": "1", "SHARDREC_SECRETS_POLL_S": "0.5"})
    assert (s.node_id, s.verify_checksums, s.tls.poll_s, s.auth.poll_s) == ("s3", False, 0.5, 0.5)
    conf = tmp_path / "f.toml"
    conf.write_text('frontend_cert_names = ["x", "y"]\nlog_level = "debug"\nkeepalive_time_ms = 10000\n')
    _, s = shard(["--node-id", "s4", "--config", str(conf)])
    assert (s.auth.frontend_names, s.observability.log_level, s.keepalive.time_s) == (("x", "y"), "DEBUG", 10.0)


@pytest.mark.parametrize(
    "argv, env, match",
    [
        ((), {"SHARDREC_REDIS_TIMEOUT_MS": "-5"}, r"--redis-timeout-ms \(from env SHARDREC_REDIS_TIMEOUT_MS\): must be > 0, got -5"),
        ((), {"SHARDREC_MAX_QUEUE": "lots"}, r"--max-queue \(from env SHARDREC_MAX_QUEUE\): want an integer, got 'lots'"),
        (("--hedge-budget", "2"), {}, r"--hedge-budget: must be between 0 and 1, got 2"),
        (("--inproc", "--lookup", "redis-kv"), {}, r"--inproc means --lookup inproc; it cannot go with --lookup redis-kv"),
        (("--inproc",), {}, r"--inproc needs --checkpoint URI"),
        (("--lookup", "torchrec"), {}, r"--lookup torchrec needs --checkpoint URI"),
        (("--eject-s", "5", "--eject-max-s", "1"), {}, r"--eject-max-s must be at least --eject-s"),
        (("--tls-cert", "c.pem"), {}, r"TLS needs --tls-cert, --tls-key and --tls-ca together"),
        (("--redis-password-file", "/nonexistent"), {}, r"--redis-password-file /nonexistent"),
        ((), {"SHARDREC_PORT": "70000"}, r"--port \(from env SHARDREC_PORT\): must be a port"),
    ],
)
def test_bad_values_fail_at_start_naming_the_setting_and_its_source(argv, env, match):
    with pytest.raises(ConfigError, match=match):
        frontend(argv, env)


def test_file_errors_name_the_file_and_the_key(tmp_path):
    conf = tmp_path / "bad.toml"
    for text, match in [
        ("redis_timout_ms = 5\n", r"'redis_timout_ms' is not a setting of frontend serve \(did you mean redis_timeout_ms\?\)"),
        ('redis_password = "x"\n', r"redis_password is a secret: give it in \$SHARDREC_REDIS_PASSWORD"),
        ('max_batch = "many"\n', rf"--max-batch \(from file {conf}\): want int, got str 'many'"),
        ("max_batch = [\n", rf"--config {conf}:"),
    ]:
        conf.write_text(text)
        with pytest.raises(ConfigError, match=match):
            frontend(["--config", str(conf)])
    with pytest.raises(ConfigError, match=r"--node-id is required \(SHARDREC_NODE_ID, or node_id in --config\)"):
        shard(())


def test_bad_flag_values_are_refused_by_the_parser_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["frontend", "serve", "--max-queue", "x"])
    assert "argument --max-queue: want an integer, got 'x'" in capsys.readouterr().err


def test_secrets_come_from_their_variable_or_file_and_are_masked(tmp_path, monkeypatch, capsys):
    pw = tmp_path / "redis.password"
    pw.write_text("from-the-file\n")
    _, c = frontend(env={"SHARDREC_REDIS_PASSWORD": "from-the-env"})
    assert c.redis_auth.password == "from-the-env"
    _, c = frontend(["--redis-password-file", str(pw)], {"SHARDREC_REDIS_PASSWORD": "from-the-env"})
    assert c.redis_auth.password == "from-the-file"
    assert "from-the" not in repr(c)
    monkeypatch.setenv("SHARDREC_REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("SHARDREC_CLUSTER", "prod")
    assert main(["config", "show", "frontend", "--max-wait-ms", "3"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "# redis_password: (set)  (env SHARDREC_REDIS_PASSWORD)" in out
    assert 'cluster = "prod"  # env SHARDREC_CLUSTER' in out and "max_wait_ms = 3.0  # flag --max-wait-ms" in out
    assert "# zk_password: (unset)  (default)" in out


def test_config_show_runs_the_checks_of_the_start(capsys):
    assert main(["config", "show", "frontend", "--inproc"]) == 1
    assert "--inproc needs --checkpoint URI" in capsys.readouterr().err
    assert main(["config", "show", "shard", "--node-id", "s0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == 'node_id = "s0"  # flag --node-id' and len(lines) == 1 + len(SHARD_SETTINGS.settings)


def test_the_shown_settings_are_a_config_file(tmp_path, capsys):
    """What ``config show`` prints, saved as a file, gives the same config."""
    assert main(["config", "show", "shard", "--node-id", "s5", "--rpc-threads", "3", "--no-verify"]) == 0
    conf = tmp_path / "shown.toml"
    conf.write_text(capsys.readouterr().out)
    _, from_file = shard(["--config", str(conf)])
    assert from_file == dataclasses.replace(ShardConfig("s5", ZkConfig()), rpc_threads=3, verify_checksums=False)


def test_keepalive_options():
    assert keepalive_options(0, 0, server=True) == [] and keepalive_options(0, 0, server=False) == []
    assert dict(keepalive_options(10.0, 2.0, server=True)) == {
        "grpc.keepalive_time_ms": 10_000, "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.min_ping_interval_without_data_ms": 5_000, "grpc.keepalive_timeout_ms": 2_000,
    }  # fmt: skip
    assert dict(keepalive_options(10.0, 0, server=False))["grpc.http2.max_pings_without_data"] == 0


# The flags of the two processes before their settings were declared on the configs.
FLAGS_BEFORE = {
    "frontend": "--admission --advertise-host --caller-burst --caller-limits --caller-rate-rps --checkpoint --cluster --cluster-token-file "
    "--default-timeout-ms --degrade-max-candidates --device --eject-max-s --eject-s --feature-check-ms --feature-sync --features "
    "--frontend-id --grace-s --hedge-budget --hedge-delay-ms --hedge-min-delay-ms --host --http-port --inproc --kv-prefix --kv-redis "
    "--lame-duck-s --latency-target-ms --log-level --lookup --max-abs-dense --max-abs-weight --max-batch --max-candidates --max-queue "
    "--max-request-bytes --max-wait-ms --on-feature-loss --port --redis --redis-ca --redis-password-file --redis-prefix "
    "--redis-timeout-ms --secrets-poll-s --session-timeout-s --tls-ca --tls-cert --tls-key --tokens-file --torch-threads --zk --zk-auth",
    "shard": "--advertise-host --cluster --cluster-token-file --frontend-cert-names --grace-s --host --load-rate-bytes-s --log-level "
    "--max-bags --max-ids --max-message-bytes --no-verify --node-id --partition-drain-s --port --rpc-threads --secrets-poll-s "
    "--session-timeout-s --stats-interval-s --tls-ca --tls-cert --tls-key --tokens-file --torch-threads --version-drain-s --zk --zk-auth",
}


@pytest.mark.parametrize("process", sorted(FLAGS_BEFORE))
def test_every_flag_spelling_of_before_is_kept(process):
    serve = build_parser()._subparsers._group_actions[0].choices[process]._subparsers._group_actions[0].choices["serve"]
    flags = {s for a in serve._actions for s in a.option_strings}
    assert not set(FLAGS_BEFORE[process].split()) - flags
