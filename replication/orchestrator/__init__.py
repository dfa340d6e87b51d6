"""The orchestrator: a configuration store and the failback journey over the agents.

:class:`Orchestrator` is the API (``replication orchestrate`` is its thin CLI):
register VMs, disks, process servers and master targets in the configuration
store, group VMs into protection groups and recovery plans, then run the three
steps of a failback from Azure: ``reprotect`` (Azure -> on-prem), ``failover`` (to
on-prem, at a recovery point) and ``reverse_reprotect`` (on-prem -> Azure). Each
step is a :class:`Job` with progress, preceded by a preflight whose
:class:`Check` list says what passed, what failed and how to fix it. See
docs/orchestrator.md.
"""

from .api import DEFAULT_STORE_DIR, Orchestrator
from .failover import shell_shutdown
from .model import Check, Disk, Estimate, Group, Job, Pair, Plan, Server, Vm
from .store import SCHEMA_VERSION, Store, open_store

__all__ = [
    "DEFAULT_STORE_DIR",
    "SCHEMA_VERSION",
    "Check",
    "Disk",
    "Estimate",
    "Group",
    "Job",
    "Orchestrator",
    "Pair",
    "Plan",
    "Server",
    "Store",
    "Vm",
    "open_store",
    "shell_shutdown",
]
