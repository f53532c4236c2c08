"""The read interface: one routed read over a session's episodic summaries and the long-term
store (:mod:`~memstream.read.memory`), its learned routing policy (:mod:`~memstream.read.routing`,
trained by :mod:`~memstream.read.train_routing`) and the HTTP service (:mod:`~memstream.read.http`)."""
