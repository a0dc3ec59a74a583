"""Merging fleet manifests that are not fleet manifests: one line, exit 2 (no export needed)."""

import json

import pytest

from toolchain.errors import ToolchainError
from toolchain.fleet.merge import merge_manifests


FILE = {"path": "a/verifier_int8.pte", "bytes": 1, "sha256": "0"}


@pytest.mark.parametrize("manifest", [
    [], {"users": "oops"}, {"users": [1]}, {"users": [{"user": "a"}]},
    {"users": [{"user": "../../evil", "files": [FILE]}]},  # an id `toolchain fleet` refuses
    {"users": [{"user": "a", "files": [{**FILE, "path": "/etc/passwd"}]}]},  # an absolute path
    {"users": [{"user": "a", "files": [{**FILE, "bytes": "abc"}]}]},
])
def test_a_malformed_manifest_is_refused(tmp_path, manifest):
    """A list or a string of users were internal errors (AttributeError, TypeError)."""
    (tmp_path / "fleet_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ToolchainError, match="malformed fleet manifest"):
        merge_manifests([tmp_path], tmp_path / "merged")
