"""Airflow DAG ``session_gc``: garbage collection of the episodic memory of sessions that
closed (their stored chain ends in their close) or stayed idle past the retention; each leaves
a signed GC record, and the pipeline never summarises a collected session again (see
memstream.maintenance.episodic). A session is collected only once ``session_consolidation``
has moved its most-read summaries to long-term memory (its signed consolidation record)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream import settings
from memstream.dags import dagkit


@dag(dag_id="session_gc", schedule="@daily", start_date=dagkit.START, catchup=False, max_active_runs=1,
     default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         "episodic_uri": dagkit.episodic_uri(), **dagkit.storage_params(),
         "retention_hours": Param(settings.SESSION_RETENTION_HOURS, type="number", exclusiveMinimum=0,
                                  description="sessions with no summary and no query for this long are collected"),
         "require_consolidation": Param(True, type="boolean",
                                        description="skip sessions without a consolidation record for their head"),
         **dagkit.key_params(),
         "dry_run": dagkit.dry_run(),
     })
def session_gc():
    @task
    def closed_sessions(**context) -> list[str]:
        import logging

        from memstream.maintenance.episodic import closed_sessions as stored_closes

        p = context["params"]
        closed = stored_closes(p["episodic_uri"], dagkit.options(p))
        logging.getLogger(__name__).info("%d closed sessions in %s", len(closed), p["episodic_uri"])
        return closed

    @task(outlets=[dagkit.EPISODIC_STORE])
    def collect(closed: list[str], **context) -> dict:
        from memstream.maintenance.episodic import collect_sessions

        p = context["params"]
        return collect_sessions(p["episodic_uri"], dagkit.options(p), retention_s=p["retention_hours"] * 3600,
                                key=dagkit.signer(p, required=not p["dry_run"]), closed=closed,
                                dry_run=p["dry_run"], require_consolidation=p["require_consolidation"])

    collect(closed_sessions())


session_gc()
