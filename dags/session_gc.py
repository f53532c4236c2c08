"""Airflow DAG ``session_gc``: garbage collection of the episodic memory of sessions that
closed (a close event on the latents topic) or stayed idle past the retention; each leaves
a signed GC record (see memstream.maintenance.episodic)."""

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
         "kafka_bootstrap": dagkit.bootstrap_param(),
         "latents_topic": Param(settings.LATENTS_TOPIC, type="string", minLength=1,
                                description="topic whose close events mark sessions closed"),
         **dagkit.key_params(),
         "dry_run": dagkit.dry_run(),
     })
def session_gc():
    @task
    def closed_sessions(**context) -> dict[str, int]:
        import logging

        from memstream.maintenance.episodic import closed_sessions as read_closes

        p = context["params"]
        if not p["kafka_bootstrap"]:
            logging.getLogger(__name__).info("no Kafka bootstrap: only idle sessions are collected")
            return {}
        closed = read_closes(p["kafka_bootstrap"], p["latents_topic"])
        logging.getLogger(__name__).info("%d closed sessions on %s", len(closed), p["latents_topic"])
        return closed

    @task(outlets=[dagkit.EPISODIC_STORE])
    def collect(closed: dict[str, int], **context) -> dict:
        from memstream.maintenance.episodic import collect_sessions

        p = context["params"]
        return collect_sessions(p["episodic_uri"], dagkit.options(p), retention_s=p["retention_hours"] * 3600,
                                key=dagkit.signer(p, required=not p["dry_run"]), closed=closed,
                                dry_run=p["dry_run"])

    collect(closed_sessions())


session_gc()
