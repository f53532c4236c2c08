"""Beam pipelines of memstream. They read like the dataflow: source, transforms, sinks."""
