"""The Celery application for ``celery -A worker.celery_app worker --pool=solo -c 1`` (or
``das-service worker``): one training job at a time, late acknowledgement, prefetch 1, and
idempotent tasks (the worker claims the job in the database; a redelivered message for a
claimed or finished job does nothing)."""

from __future__ import annotations

from service_core.queue import make_celery
from service_core.settings import get_settings

app = make_celery(get_settings())
