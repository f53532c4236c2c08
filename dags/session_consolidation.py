"""Airflow DAG ``session_consolidation``: the "sleep" before session GC. Each session GC would
collect (closed, or idle past the retention) has its most-read summaries, by the read ledger,
distilled into signed long-term entries, and gets a signed consolidation record; session_gc
collects only sessions that have one (see memstream.maintenance.consolidate)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream import settings
from memstream.dags import dagkit


@dag(dag_id="session_consolidation", schedule="@hourly", start_date=dagkit.START, catchup=False,
     max_active_runs=1, default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         "episodic_uri": dagkit.episodic_uri(), **dagkit.longterm_params(), **dagkit.storage_params(),
         "retention_hours": Param(settings.SESSION_RETENTION_HOURS, type="number", exclusiveMinimum=0,
                                  description="sessions idle this long are consolidated (session_gc's retention)"),
         "top": Param(settings.CONSOLIDATE_TOP, type="integer", minimum=1, maximum=1000,
                      description="most-read summaries per session moved to long-term memory"),
         "min_reads": Param(settings.CONSOLIDATE_MIN_READS, type="integer", minimum=1,
                            description="summaries read fewer times are not moved"),
         **dagkit.key_params(), **dagkit.validator_key_params(), **dagkit.master_key_param(),
         "dry_run": dagkit.dry_run(),
     })
def session_consolidation():
    @task(outlets=[dagkit.LONGTERM_STORE, dagkit.EPISODIC_STORE])
    def consolidate(**context) -> dict:
        from memstream.maintenance.consolidate import consolidate_sessions

        p = context["params"]
        # The maintenance key signs the consolidation records, the validator key the entries.
        key = dagkit.signer(p, required=not p["dry_run"])
        # The key table opens sealed summary tokens and seals the entries' payloads under each
        # session's subject key, which forgetting the session destroys.
        keys = dagkit.key_table(p)
        store = dagkit.longterm_store(p, signer=dagkit.signer(p, required=not p["dry_run"], role="validator"),
                                      maintenance=key, keys=keys)
        try:
            return consolidate_sessions(p["episodic_uri"], dagkit.options(p), store, key=key,
                                        retention_s=p["retention_hours"] * 3600, top=p["top"],
                                        min_reads=p["min_reads"], dry_run=p["dry_run"], keys=keys)
        finally:
            store.close()

    consolidate()


session_consolidation()
