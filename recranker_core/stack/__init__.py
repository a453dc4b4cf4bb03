"""The local stack: an embedded PostgreSQL and a SeaweedFS S3 server under $RECRANKER_HOME (and with
`stack up --ui` a Prefect server), started, found and stopped here; services configured by
environment are reported as external, never touched.

Modules::

    local.py     the interface: stack_up, stack_down, stack_status, local_prefect_api, and
                 database_url / s3_config (the external service from settings, else the local one)
    postgres.py  the embedded PostgreSQL
    s3.py        the SeaweedFS S3 server, and S3Config
    prefect.py   the Prefect server (API + UI) of `stack up --ui`
    common.py    what they share: ServiceStatus, the lock, state and secret files, ports, processes

Layout under ``settings.home``::

    pg/data/            PGDATA (postmaster.pid in it is the server's own pid file)
    pg/state.json       {"port": ...}, kept so the URL stays the same across restarts
    pg/credentials.json generated password of the ``postgres`` superuser (mode 0600)
    pg/postgres.log     server log
    s3/data/            weed data directory
    s3/state.json       {"ports": {"master": ..., "s3": ...}}
    s3/credentials.json generated S3 access/secret key (mode 0600)
    s3/identities.json  weed's -s3.config, written from credentials.json at every start (0600)
    s3/weed.pid, s3/weed.log
    prefect-server/     server.pid, server.log of the Prefect server; prefect/ is its PREFECT_HOME
"""

from recranker_core.stack.common import HOST, ServiceStatus
from recranker_core.stack.local import (
    database_url,
    local_prefect_api,
    s3_config,
    stack_down,
    stack_status,
    stack_up,
)
from recranker_core.stack.s3 import S3Config

__all__ = [
    "HOST",
    "S3Config",
    "ServiceStatus",
    "database_url",
    "local_prefect_api",
    "s3_config",
    "stack_down",
    "stack_status",
    "stack_up",
]
