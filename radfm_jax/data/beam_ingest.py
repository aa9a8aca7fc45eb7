"""`radfm-jax ingest --runner beam`: the shard tasks of data/shards.py as an Apache Beam pipeline.

    radfm-jax ingest --runner beam --manifest M --out STORE -- --direct_num_workers=2 \\
        --direct_running_mode=multi_processing
    report = ingest_beam('samples.jsonl', 'STORE', ['--runner=DataflowRunner', ...])

The pipeline is `Create(shard tasks) | Reshuffle | Map(ShardTask.run)`: each element is one shard
(up to `scans_per_shard` scans of the manifest, in order; shards.plan), the Reshuffle spreads them over the workers,
and each worker reads its scans with ingest's readers into its own shard database. The driver
(this process) holds the store's lock throughout, checks the manifest before the pipeline starts
and writes the index and manifest after it finished and every shard wrote its result (shards.py).
Beam options are passed through as given (`PipelineOptions(beam_args)`); DirectRunner by default.
Workers must see STORE at the same path (one machine, or a shared filesystem).
"""

from __future__ import annotations

from radfm_jax.data.ingest import ingest
from radfm_jax.data.shards import ShardTask, store_scans_sharded
from radfm_jax.errors import UserError

INSTALL = "pip install 'radfm-jax[beam]'"


class BeamMissing(UserError):
  """--runner beam without apache-beam installed."""


def _beam():
  try:
    import apache_beam
  except ImportError:
    raise BeamMissing(f'--runner beam needs Apache Beam, which is not installed; expected it '
                      f'installed ({INSTALL})') from None
  return apache_beam


def _run_shard(task: ShardTask) -> str:
  return task.run()


def run_on_beam(beam_args: list[str]):
  """A `store_scans_sharded` runner: the shard tasks as a Beam pipeline with `beam_args`; returns
  when the pipeline is done (a failed pipeline raises, and nothing is indexed)."""
  beam = _beam()
  from apache_beam.options.pipeline_options import PipelineOptions

  def run_tasks(tasks: list[ShardTask]):
    options = PipelineOptions(list(beam_args))
    with beam.Pipeline(options=options) as p:     # runs and waits on leaving the block
      _ = (p | 'shards' >> beam.Create(tasks)
             | 'spread' >> beam.Reshuffle()
             | 'write' >> beam.Map(_run_shard))

  return run_tasks


def beam_store_scans(beam_args: list[str] = (), scans_per_shard: int | None = None):
  """The `ingest(store_scans=...)` writer of a Beam pipeline with `beam_args` (BeamMissing at
  once, before any store is touched, when Apache Beam is not installed)."""
  _beam()
  return store_scans_sharded(run_on_beam(beam_args), scans_per_shard)


def ingest_beam(manifest, out_dir: str, beam_args: list[str] = (), scans_per_shard: int | None = None,
                **kwargs):
  """`ingest` (same arguments, same report and store rules) with the scans read and stored by a
  Beam pipeline into new shards of `out_dir` (module docstring)."""
  return ingest(manifest, out_dir, store_scans=beam_store_scans(beam_args, scans_per_shard),
                **kwargs)
