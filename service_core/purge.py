"""Removing the folders of deleted lineages once none of their jobs trains (used by the
API right after a DELETE, by the worker after a run and by every sweep). No HTTP here: the
worker imports it (see the layer contracts in pyproject.toml)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service_core.models import JOB_CANCELLING, JOB_RUNNING, Job, Lineage, utcnow
from service_core.settings import Settings
from service_core.storage import lineage_dir, remove_lineage_tree

log = logging.getLogger("das.purge")

TRAINING = (JOB_RUNNING, JOB_CANCELLING)


def purge_lineage(settings: Settings, factory: sessionmaker[Session], lineage_id: int) -> bool:
    """Remove a deleted lineage's folder once none of its jobs trains; True when removed
    now. Safe to call for any lineage (it does nothing unless the lineage is deleted)."""
    with factory() as session:
        lineage = session.get(Lineage, lineage_id)
        if lineage is None or lineage.deleted_at is None:
            return False
        busy = session.scalar(
            select(Job.id).where(Job.lineage_id == lineage_id, Job.status.in_(TRAINING)).limit(1)
        )
    if busy is not None:
        return False
    if not remove_lineage_tree(lineage_dir(settings, lineage_id)):
        log.info("lineage %s: folder still locked by a trainer; removed later", lineage_id)
        return False
    with factory() as session, session.begin():
        row = session.get(Lineage, lineage_id)
        if row is not None and row.files_removed_at is None:
            row.files_removed_at = utcnow()
    return True


def purge_deleted_lineages(settings: Settings, factory: sessionmaker[Session]) -> list[int]:
    """The sweep's part: remove the folders of deleted lineages whose last job stopped."""
    with factory() as session:
        pending = session.scalars(
            select(Lineage.id).where(
                Lineage.deleted_at.is_not(None), Lineage.files_removed_at.is_(None)
            )
        ).all()
    return [i for i in pending if purge_lineage(settings, factory, i)]
