"""Multi-host start-up: one call, `initialize()`, before anything touches a JAX device.

Which cluster is detected, in this order:
  1. explicit arguments (`initialize('10.0.0.1:1234', num_processes=2, process_id=0)`), used by
     the CPU multi-process test;
  2. RADFM_COORDINATOR=host:port + RADFM_NUM_PROCESSES + RADFM_PROCESS_ID (any GPU cluster,
     e.g. a hand-written launcher; RADFM_LOCAL_DEVICE_IDS=0,1,.. optionally);
  3. SLURM (`srun`): SLURM_JOB_ID / SLURM_NTASKS / SLURM_PROCID ... -> JAX's SLURM cluster
     detection (coordinator = first node of the job); SLURM_NTASKS > 1 outside an srun step
     (the batch script itself) is a LaunchError, not a wait for peers that never start;
  4. Cloud TPU VMs (a /dev/accel* or /dev/vfio device, MEGASCALE_* multislice variables, or
     RADFM_DISTRIBUTED=1): JAX's auto-detection from the TPU metadata;
  5. otherwise a single process: nothing to do.

CPU processes (tests) use the gloo collectives (`jax_cpu_collectives_implementation`, the default
in jax 0.10.2, set explicitly here). Call it at most once per process; a second call is a no-op.
"""

from __future__ import annotations

import os

from radfm_jax.errors import UserError

_INITIALIZED = False


class LaunchError(UserError, ValueError):
  """A cluster variable in the environment is missing or malformed (one line, exit 2)."""


def _env_int(name: str, minimum: int = 0) -> int | None:
  """The whole number in $name (None when unset or empty); anything else is one LaunchError line
  naming the variable, not int()'s traceback from inside the launcher."""
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    number = int(value)
  except ValueError:
    number = None
  if number is None or number < minimum:
    raise LaunchError(f'environment variable {name}={value!r}: expected a whole number '
                      f'>= {minimum}')
  return number


def _env_ids(name: str) -> list[int] | None:
  """$name as a comma list of device ids (`0,1,2`), or None when unset or empty."""
  value = os.environ.get(name)
  if not value:
    return None
  try:
    ids = [int(i) for i in value.split(',')]
  except ValueError:
    ids = None
  if ids is None or min(ids) < 0 or len(set(ids)) != len(ids):
    raise LaunchError(f'environment variable {name}={value!r}: expected distinct device ids '
                      'separated by commas, e.g. 0,1,2,3')
  return ids


def _check_coordinator(address: str, shown: str):
  """host:port (JAX indexes into the split and raises a bare IndexError without the port)."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise LaunchError(f'{shown}={address!r}: expected host:port, e.g. 10.0.0.1:1234')


# Step ids above slurm.h's SLURM_MAX_NORMAL_STEP_ID belong to steps no `srun` started: the batch
# script (SLURM_BATCH_SCRIPT 0xfffffffb), the extern and interactive steps.
_SLURM_SPECIAL_STEP = 0xfffffff0


def _check_slurm_step():
  """The job's batch script has SLURM_JOB_ID, SLURM_NTASKS and SLURM_PROCID=0 too, but it is one
  process: `radfm-jax train` run there (not under `srun`) would wait for SLURM_NTASKS - 1 peers
  that never start. Only an srun task has a step id of its own (SLURM_STEP_ID)."""
  step = os.environ.get('SLURM_STEP_ID', '')
  if step.isdigit() and int(step) < _SLURM_SPECIAL_STEP:
    return
  shown = f'SLURM_STEP_ID={step!r}' if step else 'no SLURM_STEP_ID'
  raise LaunchError(f"environment variable SLURM_NTASKS={os.environ['SLURM_NTASKS']!r} with "
                    f'{shown}: this is the job\'s batch script, not an srun task; start one '
                    'process per task with `srun radfm-jax train ...` (as launch/slurm_gpu.sbatch '
                    'does)')


def detect() -> str:
  """'explicit-env', 'slurm', 'tpu' or 'single' (what `initialize()` would do)."""
  if os.environ.get('RADFM_COORDINATOR'):
    return 'explicit-env'
  if all(k in os.environ for k in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID')) and (
      _env_int('SLURM_NTASKS', minimum=1) or 1) > 1:
    _check_slurm_step()
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
    _check_coordinator(coordinator_address, 'environment variable RADFM_COORDINATOR')
    num_processes = _env_int('RADFM_NUM_PROCESSES', minimum=1)
    process_id = _env_int('RADFM_PROCESS_ID')
    local_device_ids = _env_ids('RADFM_LOCAL_DEVICE_IDS') or local_device_ids
    if num_processes is None or process_id is None:
      raise LaunchError('environment variable RADFM_COORDINATOR is set: also set '
                        'RADFM_NUM_PROCESSES and RADFM_PROCESS_ID')
    if process_id >= num_processes:
      raise LaunchError(f'environment variable RADFM_PROCESS_ID={process_id}: expected one of '
                        f'0..{num_processes - 1} (RADFM_NUM_PROCESSES={num_processes})')
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


__all__ = ['LaunchError', 'detect', 'initialize']
