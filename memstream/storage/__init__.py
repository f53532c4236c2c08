"""Where memstream's stores live: LanceDB connections (:mod:`~memstream.storage.lance`), objects
under a store root (:mod:`~memstream.storage.objects`), S3 requests (:mod:`~memstream.storage.s3`)
and leases on the storage itself (:mod:`~memstream.storage.lease`)."""
