"""Moving one connection's state between agents: the sealed migration blob.

B's fencing (each migration id imported once) is ``pysteer.agent.ledger.Ledger``.
"""

from pysteer.transfer.blob import (
    MAX_BLOB_AGE,
    MAX_CLOCK_SKEW,
    BlobError,
    MigrationBlob,
    new_migration_id,
    open_sealed,
    seal,
)

__all__ = [
    "MAX_BLOB_AGE",
    "MAX_CLOCK_SKEW",
    "BlobError",
    "MigrationBlob",
    "new_migration_id",
    "open_sealed",
    "seal",
]
