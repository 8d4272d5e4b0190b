"""``influence``: run the API (with an embedded worker), a worker, migrations, the sweeper, the demo."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import click

from app.settings import get_settings


def worker_argv(queue: str, concurrency: int, loglevel: str) -> list[str]:
    """``celery worker`` arguments; the rest of the configuration is app.dispatch.celery_config."""
    return [
        "worker",
        "--loglevel",
        loglevel,
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "-Q",
        queue,
        "--without-mingle",
        "--without-gossip",
    ]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Training-data influence service. Configuration comes from IA_* environment variables."""
    from pydantic import ValidationError

    try:
        settings = get_settings()
    except ValidationError as exc:  # e.g. IA_MODE=server without IA_DATABASE_URL: one line, no traceback
        raise click.ClickException(
            "invalid configuration: "
            + "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        ) from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--worker/--no-worker",
    default=None,
    help="Start a Celery worker child process (default: on in the embedded profile).",
)
@click.option(
    "--processes",
    "api_workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="API processes (uvicorn workers); each runs the sweeper too.",
)
@click.option("--demo", is_flag=True, help="Once up, run the digits demo against this server and print it.")
@click.option("--demo-output", default="demo-output", show_default=True, help="Folder for the demo's PNGs.")
def serve(host: str, port: int, worker: bool | None, api_workers: int, demo: bool, demo_output: str) -> None:
    """Migrate the database, start the API (and a worker), optionally run the demo."""
    import uvicorn

    from app.db.migrate import upgrade
    from app.main import create_app

    settings = get_settings()
    _require_pepper(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    if settings.embedded:
        _announce_local_admin(settings)
    demo_key = _admin_key(settings) if demo else None  # before the worker starts: a refusal leaves none
    child = None
    if worker if worker is not None else settings.embedded:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            *worker_argv(settings.compute_queue, 1, "INFO"),
        ]
        child = subprocess.Popen(argv, env=os.environ.copy())
        click.echo(f"worker started (pid {child.pid}) on {settings.resolved_broker_url}", err=True)
    if demo:
        from app.demo import run_demo_when_ready

        threading.Thread(
            target=run_demo_when_ready,
            args=(f"http://{host}:{port}", demo_output, demo_key),
            daemon=True,
        ).start()
    try:
        if api_workers > 1:  # separate processes build the app themselves from the same IA_* environment
            uvicorn.run(
                "app.main:serve_app",
                factory=True,
                workers=api_workers,
                host=host,
                port=port,
                log_level=settings.log_level.lower(),
            )
        else:
            uvicorn.run(
                create_app(settings, settle_heap=True),
                host=host,
                port=port,
                log_level=settings.log_level.lower(),
            )
    finally:
        if child is not None:
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()


def _announce_local_admin(settings) -> None:
    """Embedded first start: create the local admin key and print it once."""
    from app.db.session import session_scope
    from app.services.api_keys import admin_key_file, ensure_local_admin

    with session_scope(settings) as session:
        token = ensure_local_admin(session, settings)
    if token:
        click.echo(
            f"created tenant 'local' and its admin API key (saved to {admin_key_file(settings)}):\n"
            f"  {token}\nsend it as 'Authorization: Bearer <key>'",
            err=True,
        )


def _admin_key(settings) -> str:
    from app.services.api_keys import admin_key_file

    path = admin_key_file(settings)
    if not path.exists():
        raise click.ClickException(
            f"no {path} (the embedded mode writes it): run 'influence demo --api-key <key>' (or set "
            "IA_API_KEY) against the running server"
        )
    return path.read_text().strip()


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", default=1, show_default=True, type=int)
@click.option("--queue", default=None, help="Queue to consume (default: IA_COMPUTE_QUEUE).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(concurrency: int, queue: str | None, loglevel: str) -> None:
    """Run a Celery worker: prefork, acks late, each task's compute in a fresh sandboxed process."""
    from worker.celery_app import celery_app

    celery_app.worker_main(worker_argv(queue or get_settings().compute_queue, concurrency, loglevel))


@main.command()
@click.argument("direction", type=click.Choice(["upgrade", "downgrade"]), default="upgrade")
@click.option("--revision", default=None, help="Target revision (default: head / base).")
def migrate(direction: str, revision: str | None) -> None:
    """Apply (or roll back) the Alembic migrations on the configured database."""
    from app.db import migrate as migrations

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    if direction == "upgrade":
        migrations.upgrade(url, revision or "head")
    else:
        migrations.downgrade(url, revision or "base")
    click.echo(f"{direction} done")


@main.command()
def sweep() -> None:
    """One sweeper pass (for cron): re-queue expired leases, re-publish stale queued jobs and shards
    and stuck merges of fanned-out jobs."""
    from app.services import jobs, shards

    settings = get_settings()
    published = jobs.sweep(settings)
    shard_ids, merges = shards.sweep(settings)
    click.echo(f"published {len(published)} job(s), {len(shard_ids)} shard(s), {len(merges)} merge(s)")


@main.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--output", default="demo-output", show_default=True)
@click.option(
    "--api-key",
    envvar="IA_API_KEY",
    default=None,
    help="Key to call with (default: the local admin key file).",
)
def demo(url: str, output: str, api_key: str | None) -> None:
    """Train an MLP on digits through the API, run TracInCP, print and plot top proponents/opponents."""
    from app.demo import run_demo

    run_demo(url, output, api_key or _admin_key(get_settings()))


def _require_pepper(settings) -> None:
    """A missing IA_API_KEY_PEPPER on a shared database as a one-line CLI error, before any work."""
    from app.services.api_keys import MissingPepper, pepper

    try:
        pepper(settings)
    except MissingPepper as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def keys() -> None:
    """Tenants and API keys, straight in the database (bootstrap a deployment; no key needed)."""


@keys.command("create")
@click.option("--tenant", "tenant_name", required=True, help="Tenant name; created if it does not exist.")
@click.option("--name", default="cli", show_default=True, help="A label for the key.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["read", "write", "admin"]),
    default=("read", "write"),
    show_default=True,
)
@click.option("--expires-in-days", type=click.IntRange(min=1), default=None, help="Default: never expires.")
def create_key(tenant_name: str, name: str, scopes: tuple[str, ...], expires_in_days: int | None) -> None:
    """Mint an API key and print it (the only time it is shown)."""
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.session import session_scope
    from app.schemas.tenants import TenantCreate
    from app.services import api_keys, tenants

    settings = get_settings()
    _require_pepper(settings)
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    with session_scope(settings) as session:
        tenant = tenants.by_name(session, tenant_name) or tenants.create(
            session, TenantCreate(name=tenant_name)
        )
        key, token = api_keys.create(
            session, settings, tenant, name=name, scopes=list(scopes), expires_at=expires_at
        )
        click.echo(f"key {key.key_id} for tenant {tenant.name} ({', '.join(key.scopes)}):", err=True)
    click.echo(token)


@keys.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke a key by its key_id (the 12 characters after 'iak_')."""
    from sqlalchemy import select

    from app.db.models import ApiKey
    from app.db.session import session_scope
    from app.services import api_keys

    with session_scope(get_settings()) as session:
        key = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
        if key is None:
            raise click.ClickException(f"no API key {key_id}")
        api_keys.revoke(session, key)
    click.echo(f"revoked {key_id}")


if __name__ == "__main__":
    main()
