"""``RuntimeConfig`` -> ``tf.distribute.Strategy``, and the process-wide runtime settings.

    strategy = distribute.strategy_from_config(exp.runtime)     # also applies configure()
    per_replica = distribute.per_replica_batch_size(exp.train.global_batch_size, strategy)

The same training code runs under every strategy: ``tpu`` (a TPU VM, ``local``, or a named
TPU / pod), ``mirrored`` (the GPUs of one machine; on a CPU-only machine split into logical
CPUs, every logical CPU), ``multi_worker`` (MultiWorkerMirroredStrategy from ``TF_CONFIG``,
with time limits on missing peers: :func:`configure_coordination_service`),
``one_device`` and ``default``.
"""
from __future__ import annotations

import itertools

import keras
import tensorflow as tf

from sat_tf import install
from sat_tf.config import RuntimeConfig
from sat_tf.errors import UserError


def split_cpu(n: int) -> None:
    """Splits the first physical CPU into ``n`` logical devices (/cpu:0 ... /cpu:n-1).

    Must run before TensorFlow initialises its devices; a no-op if the split is already ``n``.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    if current is None and n == 1:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        raise RuntimeError(
            f"Cannot split the CPU into {n} logical devices: TensorFlow has already initialised "
            "its devices in this process (split before any TensorFlow work).") from e


def configure(runtime: RuntimeConfig, *, seed: int | None = None) -> None:
    """Process-wide settings of ``runtime``: logical CPUs, the Keras mixed-precision policy,
    and op determinism (with ``seed`` for Python, NumPy and TensorFlow's global RNGs)."""
    if runtime.logical_cpus is not None:
        split_cpu(runtime.logical_cpus)
    keras.mixed_precision.set_global_policy(runtime.precision_policy())
    if runtime.deterministic:
        if seed is not None:
            keras.utils.set_random_seed(seed)
        tf.config.experimental.enable_op_determinism()


def _has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def mirrored_devices(runtime: RuntimeConfig) -> list[str] | None:
    """The devices MirroredStrategy gets: ``devices``; else the first ``num_gpus`` GPUs (0: the
    CPU); else every GPU (None); on a machine without GPUs, every logical CPU."""
    if runtime.devices is not None:
        return list(runtime.devices)
    if runtime.num_gpus is not None:
        return [f"/gpu:{i}" for i in range(runtime.num_gpus)] or ["/cpu:0"]
    if _has_gpu():
        return None
    cpus = tf.config.list_logical_devices("CPU")
    return [f"/cpu:{i}" for i in range(len(cpus))] if len(cpus) > 1 else ["/cpu:0"]


class _MirroredStrategy(tf.distribute.MirroredStrategy):
    """MirroredStrategy with collective keys of its own.

    Every MirroredStrategy numbers its all-reduce collectives from the same start, and
    TensorFlow caches a collective's shape by its key for the life of the process, so a second
    strategy in the same process (tests, notebooks, evaluation after training) would collide
    with the first ("Shape mismatch in the collective instance"). Each instance made here
    starts its keys at a distinct base (TensorFlow's own hook for this, ``_collective_key_base``).
    """

    _count = itertools.count(1)

    def __init__(self, devices=None):
        self._collective_key_base = next(self._count) * 100_000
        super().__init__(devices)


HEARTBEAT_TIMEOUT_SECONDS = 10   # a worker silent this long counts as dead (TensorFlow's default)


def configure_coordination_service(runtime: RuntimeConfig) -> None:
    """Sets up TensorFlow's coordination service as MultiWorkerMirroredStrategy would (same
    service type, leader and jobs, from ``TF_CONFIG``), with time limits.

    MultiWorkerMirroredStrategy configures the service only when nobody did, and without a
    registration timeout: a worker whose peers never start waits forever. Here every worker
    fails once its peers have not all registered within ``runtime.peer_timeout_seconds``;
    once running, a worker whose heartbeat stops for ``HEARTBEAT_TIMEOUT_SECONDS`` (killed,
    machine lost) makes every other worker fail (a closed connection often sooner). The
    errors are TensorFlow's (DeadlineExceeded at start-up, Unavailable later);
    ``sat_tf.cli`` turns them into one line naming the worker. No-op without a cluster in
    ``TF_CONFIG`` (one worker) or when the service is already configured.
    """
    # The CoordinatedJob proto from where MultiWorkerMirroredStrategy takes it (it has moved
    # between TensorFlow versions).
    from tensorflow.python.distribute import collective_all_reduce_strategy as mwms
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = resolver.cluster_spec()
    jobs = [j for j in ("chief", "worker") if j in cluster.jobs]
    if (not cluster.as_dict() or resolver.task_type not in jobs
            or context.context().coordination_service is not None):
        return
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=[mwms.coordination_config_pb2.CoordinatedJob(
            name=j, num_tasks=cluster.num_tasks(j)) for j in jobs],
        cluster_register_timeout_in_ms=int(min(runtime.peer_timeout_seconds, 1e9) * 1000),
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_SECONDS * 1000)
    # The leader applies the registration timeout only to a registration barrier; without it
    # the leader waits (an hour) for the others' devices instead.
    config = context.context().coordination_service
    if "cluster_register_with_barrier" in config.DESCRIPTOR.fields_by_name:
        config.cluster_register_with_barrier = True


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    install.check_tpu_build()  # another build fails in one line here, not "TPUs not found"
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":  # a TPU VM reaches its chips directly
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def strategy_from_config(runtime: RuntimeConfig, *, seed: int | None = None
                         ) -> tf.distribute.Strategy:
    """Applies :func:`configure`, then builds the strategy ``runtime`` asks for.

    ``runtime.tpu`` set means TPUStrategy whatever ``runtime.strategy`` says ("default" or
    "tpu"); any other strategy together with a TPU is an error.
    """
    runtime.validate()
    configure(runtime, seed=seed)
    name = runtime.strategy
    if runtime.tpu:
        return _tpu_strategy(runtime.tpu)
    if name == "mirrored":
        return _MirroredStrategy(mirrored_devices(runtime))
    if name == "multi_worker":
        configure_coordination_service(runtime)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "one_device":
        if runtime.devices:
            device = runtime.devices[0]
        elif runtime.num_gpus == 0:
            device = "/cpu:0"
        else:
            device = "/gpu:0" if _has_gpu() else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    return tf.distribute.get_strategy()


DEFAULT_EVAL_BATCH_SIZE = 128


def eval_batch_size(requested: int | None, strategy: tf.distribute.Strategy) -> int:
    """The global evaluation batch: ``requested`` (which must divide evenly over the
    replicas), else 128 rounded up to a multiple of the replica count (8 on a v3-8, 256 on
    a 256-chip pod slice), so the default fits every strategy."""
    if requested is not None:
        per_replica_batch_size(requested, strategy, what="eval batch size")
        return requested
    n = strategy.num_replicas_in_sync
    return -(-DEFAULT_EVAL_BATCH_SIZE // n) * n


def per_replica_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy,
                           what: str = "global batch size") -> int:
    """``global_batch_size / replicas``; a one-line ValueError when it does not divide."""
    n = strategy.num_replicas_in_sync
    if global_batch_size % n:
        raise UserError(
            f"The {what} {global_batch_size} is not divisible by the {n} replicas of "
            f"{type(strategy).__name__}; use a multiple of {n}.")
    return global_batch_size // n


def chief(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """(is this process the chief, its worker index) under a multi-worker strategy; every
    single-process strategy is its own chief, worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type in (None, "chief") or (task_type == "worker" and task_id == 0
                                                and not has_chief)
    return is_chief, task_id


def spans_processes(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy's replicas run in several processes (MultiWorkerMirroredStrategy
    across workers), which must then agree on decisions such as stopping."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def local_replicas(strategy: tf.distribute.Strategy) -> int:
    """How many of the strategy's replicas run on this host."""
    try:
        return len(strategy.extended.worker_devices)
    except RuntimeError:          # the default strategy: one replica
        return 1
