"""``influence``: run the API (with an embedded worker), a worker, migrations, the sweeper, the demo."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import click

from app.settings import get_settings


def _worker_argv(queue: str, concurrency: int, loglevel: str) -> list[str]:
    return [
        "worker",
        "--loglevel",
        loglevel,
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--max-tasks-per-child",
        "1",
        "-Q",
        queue,
        "--without-mingle",
        "--without-gossip",
    ]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Training-data influence service. Configuration comes from IA_* environment variables."""
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--worker/--no-worker",
    default=None,
    help="Start a Celery worker child process (default: on in the embedded profile).",
)
@click.option("--demo", is_flag=True, help="Once up, run the digits demo against this server and print it.")
@click.option("--demo-output", default="demo-output", show_default=True, help="Folder for the demo's PNGs.")
def serve(host: str, port: int, worker: bool | None, demo: bool, demo_output: str) -> None:
    """Migrate the database, start the API (and a worker), optionally run the demo."""
    import uvicorn

    from app.db.migrate import upgrade
    from app.main import create_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    child = None
    if worker if worker is not None else settings.embedded:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            *_worker_argv(settings.compute_queue, 1, "INFO"),
        ]
        child = subprocess.Popen(argv, env=os.environ.copy())
        click.echo(f"worker started (pid {child.pid}) on {settings.resolved_broker_url}", err=True)
    if demo:
        from app.demo import run_demo_when_ready

        threading.Thread(
            target=run_demo_when_ready, args=(f"http://{host}:{port}", demo_output), daemon=True
        ).start()
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower())
    finally:
        if child is not None:
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", default=1, show_default=True, type=int)
@click.option("--queue", default=None, help="Queue to consume (default: IA_COMPUTE_QUEUE).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(concurrency: int, queue: str | None, loglevel: str) -> None:
    """Run a Celery worker: prefork, one task per child process, acks late."""
    from worker.celery_app import celery_app

    celery_app.worker_main(_worker_argv(queue or get_settings().compute_queue, concurrency, loglevel))


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
    """One sweeper pass: re-queue expired leases and re-publish stale queued jobs (for cron)."""
    from app.services.jobs import sweep as run_sweep

    click.echo(f"published {len(run_sweep(get_settings()))} job(s)")


@main.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--output", default="demo-output", show_default=True)
def demo(url: str, output: str) -> None:
    """Train an MLP on digits through the API, run TracInCP, print and plot top proponents/opponents."""
    from app.demo import run_demo

    run_demo(url, output)


if __name__ == "__main__":
    main()
