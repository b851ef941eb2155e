"""The Dask executor: scale-out on a dask.distributed cluster that shares our storage."""

from daemon.executors.dask.client import ClusterLostError
from daemon.executors.dask.executor import DaskExecutor
from daemon.executors.dask.probe import PROBE_PREFIX, probe_cluster, probe_worker

__all__ = ["PROBE_PREFIX", "ClusterLostError", "DaskExecutor", "probe_cluster", "probe_worker"]
