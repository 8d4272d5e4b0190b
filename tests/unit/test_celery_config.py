"""The Celery configuration has the delivery settings RELIABILITY.md 4.1 and CONVENTIONS.md 8 rely on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from celery import Celery
from celery.app.defaults import DEFAULTS

from app.dispatch import celery_config
from app.settings import Settings

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def _no_machine_settings(monkeypatch):
    """Settings come from the arguments only: no IA_* variable of the machine leaks in."""
    for name in os.environ:
        if name.startswith("IA_"):
            monkeypatch.delenv(name)


def _settings(tmp_path, **values) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **values)


def _app(config: dict) -> Celery:
    app = Celery("config-test")
    app.conf.update(config)
    return app


@pytest.fixture
def redis_config(tmp_path) -> dict:
    return celery_config(_settings(tmp_path, broker_url=REDIS))


@pytest.mark.parametrize("broker", [REDIS, None])
def test_every_key_is_a_celery_setting(tmp_path, broker):
    """Celery ignores unknown keys, so a misspelt setting would silently fall back to its default."""
    config = celery_config(_settings(tmp_path, broker_url=broker))
    assert set(config) <= set(DEFAULTS), set(config) - set(DEFAULTS)


def test_at_least_once_delivery(redis_config):
    app = _app(redis_config)
    assert app.conf.task_acks_late is True  # ack after the task returns: a dead worker gives the message back
    assert app.conf.worker_prefetch_multiplier == 1  # one reserved message per pool process
    # A killed pool child requeues its message; the DB attempt counter (IA_MAX_ATTEMPTS) caps the re-runs.
    assert app.conf.task_reject_on_worker_lost is True
    # A broker blip leaves the running job alone: Redis redelivers only after the visibility timeout
    # and the DB lease turns the second delivery away (README "How a job runs", item 5).
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False


def test_json_only(redis_config):
    app = _app(redis_config)
    assert app.conf.task_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    assert app.conf.result_serializer == "json"
    assert app.conf.event_serializer == "json"
    # Results are not accepted in any other format either (None falls back to accept_content).
    assert app.conf.result_accept_content in (None, ["json"])


def test_no_result_backend(redis_config):
    """Results live in PostgreSQL and the artifact store, never in Redis."""
    app = _app(redis_config)
    assert app.conf.task_ignore_result is True
    assert app.conf.result_backend is None
    assert type(app.backend).__name__ == "DisabledBackend"


@pytest.mark.parametrize("hard", [None, 600, 12 * 3600])
def test_visibility_timeout_outlasts_the_hard_time_limit(tmp_path, hard):
    """Redis hands an unacked message to another worker after the visibility timeout."""
    values = {"broker_url": REDIS}
    if hard is not None:
        values.update(task_soft_time_limit=hard - 60, task_time_limit=hard)
    settings = _settings(tmp_path, **values)
    config = celery_config(settings)
    assert config["task_time_limit"] == settings.task_time_limit
    assert config["task_soft_time_limit"] == settings.task_soft_time_limit
    assert config["task_soft_time_limit"] < config["task_time_limit"]
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    # The socket timeouts keep a hung Redis from hanging the API's publishes.
    assert config["broker_transport_options"]["socket_timeout"] > 0
    assert config["broker_transport_options"]["socket_connect_timeout"] > 0


def test_default_time_limits_leave_room_for_the_sandbox(tmp_path):
    settings = _settings(tmp_path, broker_url=REDIS)
    assert settings.sandbox_wall_seconds < settings.task_soft_time_limit < settings.task_time_limit


def test_soft_shutdown_requeues_running_work(tmp_path, monkeypatch):
    """A positive timeout enables Celery's soft shutdown: running tasks get that long, then are cancelled
    and their unacked messages restored to the queue (RELIABILITY.md 4.1)."""
    default = _settings(tmp_path, broker_url=REDIS)
    assert default.worker_soft_shutdown_timeout > 0
    assert _app(celery_config(default)).conf.worker_soft_shutdown_timeout == (
        default.worker_soft_shutdown_timeout
    )
    # Below Docker's default 10 s stop grace period, so the cancel happens before the SIGKILL.
    assert default.worker_soft_shutdown_timeout < 10

    monkeypatch.setenv("IA_WORKER_SOFT_SHUTDOWN_TIMEOUT", "25")
    assert celery_config(_settings(tmp_path, broker_url=REDIS))["worker_soft_shutdown_timeout"] == 25
    with pytest.raises(ValueError):
        _settings(tmp_path, worker_soft_shutdown_timeout=-1)


def test_worker_pool_recycling_follows_settings(tmp_path):
    config = celery_config(
        _settings(
            tmp_path, broker_url=REDIS, worker_max_tasks_per_child=7, worker_max_memory_bytes=3 * 1024**2
        )
    )
    assert config["worker_max_tasks_per_child"] == 7
    assert config["worker_max_memory_per_child"] == 3 * 1024  # Celery counts KiB
    never = celery_config(
        _settings(tmp_path, broker_url=REDIS, worker_max_tasks_per_child=0, worker_max_memory_bytes=0)
    )
    assert never["worker_max_tasks_per_child"] is None
    assert never["worker_max_memory_per_child"] is None


def test_embedded_broker_uses_the_data_dir(tmp_path):
    """The embedded filesystem:// queue lives under IA_DATA_DIR; the delivery settings are the same."""
    settings = _settings(tmp_path)
    config = celery_config(settings)
    assert config["broker_url"] == "filesystem://"
    options = config["broker_transport_options"]
    assert options["data_folder_in"] == options["data_folder_out"] == str(settings.queue_dir / "in")
    for key in ("data_folder_in", "processed_folder", "control_folder"):
        assert Path(options[key]).parent == (tmp_path / "queue").resolve()
        assert Path(options[key]).is_dir()
    redis = celery_config(_settings(tmp_path, broker_url=REDIS))
    shared = {k for k in config if k not in ("broker_url", "broker_transport_options")}
    assert {k: config[k] for k in shared} == {k: redis[k] for k in shared}


def test_mode_server_refuses_to_fall_back_to_sqlite(tmp_path):
    """IA_MODE=server: a deployment that lost IA_DATABASE_URL or IA_BROKER_URL fails at start (one CLI
    line) rather than quietly running on SQLite and the filesystem broker; embedded refuses a URL."""
    from click.testing import CliRunner
    from pydantic import ValidationError

    from app.cli import main
    from app.settings import get_settings

    pg, redis = "postgresql+psycopg://u@127.0.0.1/db", "redis://127.0.0.1:6379/0"
    with pytest.raises(ValidationError, match="IA_MODE=server needs IA_DATABASE_URL and IA_BROKER_URL"):
        _settings(tmp_path, mode="server")
    with pytest.raises(ValidationError, match="IA_MODE=embedded runs on SQLite"):
        _settings(tmp_path, mode="embedded", database_url=pg)
    assert not _settings(tmp_path, mode="server", database_url=pg, broker_url=redis).embedded
    assert _settings(tmp_path, mode="embedded").embedded and _settings(tmp_path).embedded
    get_settings.cache_clear()
    result = CliRunner().invoke(main, ["sweep"], env={"IA_MODE": "server", "IA_DATABASE_URL": pg})
    get_settings.cache_clear()
    assert (
        result.exit_code == 1 and "invalid configuration: IA_MODE=server needs IA_BROKER_URL" in result.output
    )
