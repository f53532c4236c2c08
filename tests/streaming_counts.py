"""A small streaming pipeline for the runner tests: per-key state plus an event-time timer.

Kafka records are keyed; each key's count lives in state, and a timer set one second of
event time after the latest element flushes "key=count" to the output topic. The output
appears while the input topic is still open, which is what a runner that really streams does.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration

from memstream.pipelines.kafka_io import ReadFromKafka, write_to_kafka


class CountThenFlush(beam.DoFn):
    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def process(self, kv, ts=beam.DoFn.TimestampParam, count=beam.DoFn.StateParam(COUNT),
                flush=beam.DoFn.TimerParam(FLUSH)):
        count.write((count.read() or 0) + 1)
        flush.set(ts + Duration(seconds=1))

    @on_timer(FLUSH)
    def on_flush(self, key=beam.DoFn.KeyParam, count=beam.DoFn.StateParam(COUNT)):
        yield key, f"{key.decode()}={count.read()}".encode()


def run(bootstrap: str, source: str, sink: str, runner_args: list[str]):
    with beam.Pipeline(options=PipelineOptions(runner_args)) as p:
        (p
         | ReadFromKafka(bootstrap, [source])
         | "KeyByKafkaKey" >> beam.Map(lambda r: (r.key, r.value))
         | "CountPerKey" >> beam.ParDo(CountThenFlush())
         | write_to_kafka(bootstrap, sink))


if __name__ == "__main__":
    import sys

    run(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
