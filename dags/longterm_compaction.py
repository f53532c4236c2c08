"""Airflow DAG ``longterm_compaction``: compaction, cleanup of old versions and vector index
upkeep of the long-term store (under the maintenance lease), and compaction of the episodic
tables; runs whenever a maintenance DAG has changed the long-term store
(see memstream.maintenance.longterm)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from memstream.dags import dagkit


@dag(dag_id="longterm_compaction", schedule=[dagkit.LONGTERM_STORE], start_date=dagkit.START, catchup=False,
     max_active_runs=1, default_args=dagkit.DEFAULT_ARGS, tags=dagkit.TAGS, doc_md=__doc__,
     params={
         **dagkit.longterm_params(), **dagkit.storage_params(),
         "episodic_uri": Param(None, type=["null", "string"], pattern=dagkit.URI_PATTERN,
                               description="also compact this episodic store (null: skip)"),
         "cleanup_older_than_hours": Param(24.0 * 7, type="number", minimum=0,
                                           description="versions older than this are dropped"),
         "index_min_rows": Param(10_000, type="integer", minimum=1,
                                 description="the hot tier gets a vector index from this many rows"),
         "reindex_unindexed_fraction": Param(0.2, type="number", minimum=0, maximum=1,
                                             description="rebuild the index when more rows than this are outside it"),
     })
def longterm_compaction():
    @task
    def compact_longterm(**context) -> dict:
        from memstream.maintenance.longterm import compact

        p = context["params"]
        return compact(dagkit.longterm_store(p), cleanup_older_than_s=p["cleanup_older_than_hours"] * 3600,
                       index_min_rows=p["index_min_rows"], reindex_unindexed_fraction=p["reindex_unindexed_fraction"])

    @task
    def compact_episodic(**context) -> dict:
        from memstream.maintenance.longterm import compact_episodic as compact_tables

        p = context["params"]
        if not p["episodic_uri"]:
            return {"tables": 0}
        return compact_tables(p["episodic_uri"], dagkit.options(p),
                              cleanup_older_than_s=p["cleanup_older_than_hours"] * 3600)

    compact_longterm()
    compact_episodic()


longterm_compaction()
