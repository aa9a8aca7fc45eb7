"""Multi-host start-up: one call, `initialize()`, before anything touches a JAX device.

Which cluster is detected, in this order:
  1. explicit arguments (`initialize('10.0.0.1:1234', num_processes=2, process_id=0)`), used by
     the CPU multi-process test;
  2. RADFM_COORDINATOR=host:port + RADFM_NUM_PROCESSES + RADFM_PROCESS_ID (any GPU cluster,
     e.g. a hand-written launcher; RADFM_LOCAL_DEVICE_IDS=0,1,.. optionally);
  3. SLURM (`srun`): SLURM_JOB_ID / SLURM_NTASKS / SLURM_PROCID ... -> JAX's SLURM cluster
     detection (coordinator = first node of the job);
  4. Cloud TPU VMs (a /dev/accel* or /dev/vfio device, MEGASCALE_* multislice variables, or
     RADFM_DISTRIBUTED=1): JAX's auto-detection from the TPU metadata;
  5. otherwise a single process: nothing to do.

CPU processes (tests) use the gloo collectives (`jax_cpu_collectives_implementation`, the default
in jax 0.10.2, set explicitly here). Call it at most once per process; a second call is a no-op.
"""

from __future__ import annotations

import os

_INITIALIZED = False


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else None


def detect() -> str:
  """'explicit-env', 'slurm', 'tpu' or 'single' (what `initialize()` would do)."""
  if os.environ.get('RADFM_COORDINATOR'):
    return 'explicit-env'
  if all(k in os.environ for k in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID')) and int(
      os.environ.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  if os.environ.get('TPU_WORKER_HOSTNAMES', 'localhost') not in ('', 'localhost') or (
      os.environ.get('TPU_WORKER_ID') is not None and os.environ.get('TPU_SKIP_MDS_QUERY') is None):
    return 'tpu'
  if os.environ.get('MEGASCALE_COORDINATOR_ADDRESS') or os.environ.get('RADFM_DISTRIBUTED') == '1':
    return 'tpu'      # multislice, or forced (launch/tpu_pod.sh sets RADFM_DISTRIBUTED=1)
  if os.path.exists('/dev/accel0') or os.path.exists('/dev/vfio/0'):
    return 'tpu'      # a Cloud TPU VM: JAX reads the pod layout from the metadata server
  return 'single'


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None,
               initialization_timeout: int = 300) -> dict:
  """Starts JAX's distributed runtime when this is one of several processes.

  Returns {'mode', 'process_index', 'process_count'}.
  """
  global _INITIALIZED
  import jax

  if _INITIALIZED:
    return {'mode': 'already', 'process_index': jax.process_index(),
            'process_count': jax.process_count()}
  mode = 'explicit' if coordinator_address else detect()
  if mode == 'explicit-env':
    coordinator_address = os.environ['RADFM_COORDINATOR']
    num_processes = _env_int('RADFM_NUM_PROCESSES')
    process_id = _env_int('RADFM_PROCESS_ID')
    ids = os.environ.get('RADFM_LOCAL_DEVICE_IDS')
    if ids:
      local_device_ids = [int(i) for i in ids.split(',')]
    if num_processes is None or process_id is None:
      raise ValueError('RADFM_COORDINATOR is set: also set RADFM_NUM_PROCESSES and '
                       'RADFM_PROCESS_ID')
  if mode == 'single':
    return {'mode': mode, 'process_index': 0, 'process_count': 1}
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except Exception:     # option renamed / removed in a later jax: its default is used
    pass
  if mode in ('explicit', 'explicit-env'):
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
  else:                   # slurm / tpu: JAX reads the cluster from the environment
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  _INITIALIZED = True
  return {'mode': mode, 'process_index': jax.process_index(),
          'process_count': jax.process_count()}


__all__ = ['detect', 'initialize']
