"""Airflow DAGs that maintain the memory (decay, GC, demotion, purge, compaction, anchoring)."""
