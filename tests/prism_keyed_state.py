"""A minimal pipeline for tests/test_runners.py: per-key counts in keyed state, over elements
large enough that Prism's bundles of the stateful stage are slow. Prints "key count" per element;
with keyed state kept, each key counts 1, 2, ... exactly once.

    python prism_keyed_state.py ELEMENTS BYTES <runner args>
"""

from __future__ import annotations

import sys

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec


class Count(beam.DoFn):
    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())

    def process(self, kv, count=beam.DoFn.StateParam(COUNT)):
        key, _ = kv
        n = (count.read() or 0) + 1
        count.write(n)
        yield f"{key} {n}"


def run(elements: int, size: int, runner_args: list[str]) -> None:
    with beam.Pipeline(options=PipelineOptions(runner_args)) as p:
        (p
         | beam.Create(list(range(elements)))
         | beam.Map(lambda i: (f"k{i % 7}", b"x" * size)).with_output_types(tuple[str, bytes])
         | beam.ParDo(Count())
         | beam.Map(lambda line: print(line, flush=True)))


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
