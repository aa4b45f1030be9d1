"""A node's Celery app: the shared configuration, the task, the pool."""

from __future__ import annotations

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_process_init

from ..wire.config import create_app
from ..wire.protocol import STOP_SIGNAL, TASK_NAME
from . import control  # noqa: F401  (registers the info command)
from .guard import install_fit_guard
from .memory import after_task, before_task
from .remote import ControlGuard
from .settings import CONF_KEY, NodeSettings
from .task import SignedLostRequest, run_batch

__all__ = ["create_node_app"]


def create_node_app(
    broker_url: str, backend_url: str | None = None, settings: NodeSettings | None = None
) -> Celery:
    """The Celery app a node runs: ``run_batch`` on its own queue."""
    app = create_app(broker_url, backend_url)
    app.conf.update(
        {
            CONF_KEY: settings or NodeSettings(),
            "worker_pool": "clustersearch.node.pool:TaskPool",
            # The embedded transport's blocking pool fails the fit of a pool
            # process that died (OOM killer, SIGKILL) only after this wait for
            # a result it might have sent (Celery's default, 10 s, for each
            # lost fit); a result travels in milliseconds. The event-loop pool
            # of the other transports fails it as soon as it reaps the
            # process, which TaskPool looks for every POOL_CHECK_S.
            "worker_lost_wait": 1.0,
        }
    )
    app.steps["consumer"].add(ControlGuard)
    # The worker-lost failure the main process stores is signed (task.py).
    app.task(name=TASK_NAME, bind=True, shared=False, Request=SignedLostRequest)(run_batch)
    worker_process_init.connect(install_fit_guard, weak=False, dispatch_uid=STOP_SIGNAL)
    # A pool process gives back what a fit left behind (node/memory.py).
    task_prerun.connect(before_task, weak=False, dispatch_uid="clustersearch.before_task")
    task_postrun.connect(after_task, weak=False, dispatch_uid="clustersearch.after_task")
    return app
