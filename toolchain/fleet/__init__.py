"""Per-user verifier files at fleet scale: one template per (format, precision), each user's
values written into it (byte-identical to that user's full export)."""

from toolchain.fleet.merge import merge_manifests
from toolchain.fleet.run import MANIFEST, FleetResult, read_users, run_fleet, shard_of

__all__ = ["MANIFEST", "FleetResult", "merge_manifests", "read_users", "run_fleet", "shard_of"]
