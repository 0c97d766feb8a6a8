"""Moving one connection's state between agents: the sealed migration blob and fencing."""

from pysteer.transfer.blob import (
    BlobError,
    ImportLedger,
    MigrationBlob,
    new_migration_id,
    open_sealed,
    seal,
)

__all__ = ["BlobError", "ImportLedger", "MigrationBlob", "new_migration_id", "open_sealed", "seal"]
