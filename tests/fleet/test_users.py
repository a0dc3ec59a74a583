"""Reading a fleet's users, and hash shards (no export needed)."""

import pytest

from toolchain.errors import ToolchainError
from toolchain.fleet.run import parse_shard, read_users, shard_of


def test_folder_and_list_sources(tmp_path):
    for name in ("ann", "bob", "bad id!", "empty"):
        (tmp_path / "users" / name).mkdir(parents=True)
    (tmp_path / "users" / "ann" / "b.png").write_bytes(b"x")
    (tmp_path / "users" / "ann" / "a.jpg").write_bytes(b"x")
    (tmp_path / "users" / "bob" / "1.png").write_bytes(b"x")
    (tmp_path / "users" / "bad id!" / "1.png").write_bytes(b"x")
    users, problems = read_users(tmp_path / "users")
    assert [(u.user, u.image.name, [p.name for p in u.others]) for u in users] == [("ann", "a.jpg", ["b.png"]),
                                                                                  ("bob", "1.png", [])]
    assert any("'bad id!'" in p for p in problems) and any("empty" in p and "no image" in p for p in problems)

    listing = tmp_path / "users.tsv"
    listing.write_text("# id\\tpath\ncarl\timgs/c.png\n../up\tx.png\ncarl\tother.png\nno-tab-here\n")
    users, problems = read_users(listing)
    assert [(u.user, u.image) for u in users] == [("carl", tmp_path / "imgs" / "c.png")]
    assert [p.split(": ")[0] for p in problems] == [f"{listing}:5", f"{listing}:3", f"{listing}:4"]
    with pytest.raises(ToolchainError):
        read_users(tmp_path / "missing")


def test_shards_are_stable_and_cover_everyone():
    ids = [f"user{i}" for i in range(1000)]
    shards = [shard_of(u, 4) for u in ids]
    assert shards == [shard_of(u, 4) for u in ids] and set(shards) == {0, 1, 2, 3}
    assert min(shards.count(k) for k in range(4)) > 200  # roughly even
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x/2", "1-2", "-1/2"):
        with pytest.raises(ToolchainError):
            parse_shard(bad)


def test_an_empty_or_binary_users_list_is_refused(tmp_path):
    """An empty list made a fleet of 0 users exit 0; random bytes were read as 104 skipped lines."""
    (tmp_path / "empty.tsv").write_text("# no users yet\n")
    (tmp_path / "folder").mkdir()
    for src in (tmp_path / "empty.tsv", tmp_path / "folder"):
        with pytest.raises(ToolchainError, match="lists no users"):
            read_users(src)
    (tmp_path / "random.tsv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ToolchainError, match="not UTF-8"):
        read_users(tmp_path / "random.tsv")
