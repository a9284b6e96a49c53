"""Dataset preparation: logs loaded and split by user, crops and item-less copies, files
merged, too-small logs refused (the training itself: tests/test_train.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from conftest import TAOBAO_100
from typer.testing import CliRunner

from app.cli import cli
from app.core.events import Events
from model_export.data import read_events
from model_export.dataset import (
    TrainConfig,
    _drop_repeats,
    _warn_shared_users,
    add_crops,
    add_without_items,
    prepare,
)


def test_crops_start_mid_history_with_real_lengths():
    ev, _ = read_events(TAOBAO_100, "taobao")
    out = add_crops(ev, np.random.default_rng(0), per_user=2)
    ids = out.user_id_strings().astype(str)
    crop = np.char.find(ids, "@crop") >= 0
    assert np.array_equal(np.sort(out.timestamp_ms[~crop]), np.sort(ev.timestamp_ms))  # real rows all kept
    n_long = int((np.bincount(ev.user) >= 8).sum())
    assert len(set(ids[crop])) == 2 * n_long
    by_user = {u: ev.timestamp_ms[ev.user_id_strings() == u] for u in ev.user_ids}
    lengths = []
    for cid in set(ids[crop]):
        host = by_user[cid.split("@crop")[0]]
        t = out.timestamp_ms[ids == cid]
        lengths.append(t.size)
        assert t[0] > host.min() or (host == host.min()).sum() > 1, "a crop never starts at the real start"
        assert np.isin(t, host).all()
    assert np.median(lengths) < np.median(np.bincount(ev.user))  # drawn from the users' lengths, capped
    assert add_crops(ev, np.random.default_rng(0), per_user=0) is ev


def test_users_without_items_are_copies_with_no_item_or_category():
    ev, _ = read_events(TAOBAO_100, "taobao")
    out = add_without_items(ev, np.random.default_rng(0), 0.1)
    ids = out.user_id_strings().astype(str)
    bare = np.char.endswith(ids, "@noitem")
    assert len(set(ids[bare])) == 10  # 10% of the 100 users
    assert (out.item_id[bare] == 0).all() and (out.category_id[bare] == 0).all()
    assert (out.item_id[~bare] != 0).all(), "the real rows keep their ids"
    hosts = {u.removesuffix("@noitem") for u in ids[bare]}
    for h in hosts:
        assert np.array_equal(np.sort(out.timestamp_ms[ids == h]), np.sort(out.timestamp_ms[ids == f"{h}@noitem"]))
    assert add_without_items(ev, np.random.default_rng(0), 0.0) is ev


def test_stores_sharing_user_ids_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_text('{"user_id": "7", "event_type": "view", "timestamp": 1511596870000}\n')
    b.write_text("user_id,event_type,timestamp\n7,view,1511596871000\n8,view,1511596872000\n")
    loaded = [read_events(a, "jsonl"), read_events(b, "csv")]
    with caplog.at_level("WARNING", logger="seqguard.train"):
        assert _warn_shared_users([a, b], loaded) == 1
    assert "share 1 user ids" in caplog.text
    same_log = [read_events(b, "csv"), read_events(b, "csv")]
    assert _warn_shared_users([b, b], same_log) == 0  # one log's files share users by design


def test_rows_in_both_files_count_once():
    ev = Events.from_records([{"user_id": "u", "event_type": "pv", "timestamp": t, "item_id": "i"}
                              for t in (1, 2, 2, 3)])
    assert len(_drop_repeats(ev)) == 3


def test_two_files_split_by_user_with_real_splits_kept(tmp_path: Path):
    # The same users in two files: each user lands in one split; repeated rows count once.
    with gzip.open(TAOBAO_100, "rt") as f:
        lines = f.read().splitlines()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("\n".join(lines[: len(lines) // 2 + 50]) + "\n")
    b.write_text("\n".join(lines[len(lines) // 2 :]) + "\n")
    cfg = TrainConfig(window=16, seed=3)
    prep = prepare([a, b], "taobao", ["order_brushing"], cfg)
    whole = prepare(TAOBAO_100, "taobao", ["order_brushing"], cfg)
    for name in ("train", "val", "test"):
        assert len(prep.real[name]) == len(whole.real[name]), name
        assert set(prep.real[name].user_ids[np.unique(prep.real[name].user)]) == set(
            whole.real[name].user_ids[np.unique(whole.real[name].user)])
    assert [f["name"] for f in prep.source["files"]] == ["a.csv", "b.csv"]
    assert set(prep.spec.event_types) == {"view", "cart", "favorite", "purchase"}
    test_ids = prep.splits["test"].user_id_strings().astype(str)
    assert not (np.char.find(test_ids, "@crop") >= 0).any(), "held-out users are never cropped"


@pytest.mark.parametrize("users", [5, 11])
def test_too_few_users_are_refused_in_one_line(tmp_path: Path, users: int):
    """Issue 9: 5 users ended in an IndexError, 11 trained without a word (review = block)."""
    with gzip.open(TAOBAO_100, "rt") as f:
        rows = [line for line in f if line.strip()]
    keep = set(list(dict.fromkeys(r.split(",")[0] for r in rows))[:users])  # the first users, in file order
    small = tmp_path / "small.csv"
    small.write_text("".join(r for r in rows if r.split(",")[0] in keep))
    res = CliRunner().invoke(cli, ["train", "--events", str(small), "--format", "taobao", "--epochs", "1",
                                   "--out", str(tmp_path / "run")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and f"small.csv: {users} users are too few to train on" in out
    assert "at least 10" in out and not (tmp_path / "run" / "model.pt").exists()
