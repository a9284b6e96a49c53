"""One event vocabulary: the alias table, events renamed on their dictionary, every loader
giving canonical names (the replay stream excepted), the service's setting, and bundles
taking a deployment's aliases."""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TAOBAO_100
from pydantic import ValidationError

from app.core.bundle import load_bundle
from app.core.events import Events
from app.core.vocabulary import CANONICAL, DEFAULT_ALIASES, build_aliases, canonical, parse_alias_pairs
from app.settings import Settings
from model_export.data import iter_event_chunks, iter_records, read_events

HERE = Path(__file__).resolve().parent
REES46_SLICE = HERE / "data" / "loader_rees46_slice.csv.gz"
T0 = 1_700_000_000_000


def names(events: Events) -> list[str]:
    return events.event_type_names().tolist()


def assert_distinct_dictionary(events: Events) -> None:
    assert len(set(events.event_types)) == len(events.event_types), events.event_types


# ---- the table -------------------------------------------------------------------------------


def test_every_source_name_maps_to_a_canonical_type() -> None:
    assert set(DEFAULT_ALIASES.values()) == set(CANONICAL)
    assert {canonical(t) for t in CANONICAL} == set(CANONICAL)
    spellings = {"pv": "view", "fav": "favorite", "buy": "purchase", "addtocart": "cart", "transaction": "purchase",
                 "clicks": "view", "carts": "cart", "orders": "purchase", "0": "view", "1": "cart", "2": "purchase",
                 "3": "favorite", "alipay": "purchase", "collect": "favorite", "remove_from_cart": "remove_from_cart"}
    assert {k: canonical(k) for k in spellings} == spellings
    assert canonical(" PV ") == "view" and canonical("login") == "login"


def test_extra_aliases_override_and_resolve_one_step() -> None:
    table = build_aliases({"Checkout": "buy", "click": "cart", "signin": "login"})
    assert table["checkout"] == "purchase"  # a Taobao name on the right means its type
    assert table["click"] == "cart"  # an extra entry overrides the project's
    assert table["signin"] == "login"  # unknown on the right: kept as given
    assert DEFAULT_ALIASES["click"] == "view"  # the project's table is untouched
    with pytest.raises(ValueError, match="empty event type"):
        build_aliases({"x": " "})


def test_alias_pairs() -> None:
    assert parse_alias_pairs([" checkout = purchase", "a=b=c"]) == {"checkout": "purchase", "a": "b=c"}
    for bad in ("checkout", "=purchase", "checkout=", " = "):
        with pytest.raises(ValueError, match="expected NAME=TYPE"):
            parse_alias_pairs([bad])


def test_events_renamed_on_the_dictionary_with_codes_merged() -> None:
    raw = ["pv", "view", "login", "PV", "buy", "click", "login"]
    ev = Events.from_records([{"user_id": "u", "event_type": t, "timestamp": T0 + i} for i, t in enumerate(raw)])
    canon = ev.with_canonical_types()
    assert names(canon) == ["view", "view", "login", "view", "purchase", "view", "login"]
    assert_distinct_dictionary(canon)
    assert sorted(canon.event_types) == ["login", "purchase", "view"]
    np.testing.assert_array_equal(canon.timestamp_ms, ev.timestamp_ms)  # rows untouched
    assert canon.with_canonical_types() is canon  # nothing to rename: the same object
    custom = ev.with_canonical_types(build_aliases({"login": "view"}))
    assert set(custom.event_types) == {"purchase", "view"}
    assert Counter(names(custom)) == {"view": 6, "purchase": 1}


# ---- loaders -----------------------------------------------------------------------------------


def raw_taobao_types() -> list[str]:
    with gzip.open(TAOBAO_100, "rt", newline="") as f:
        return [row[3] for row in csv.reader(f)]


def test_taobao_names_come_out_canonical() -> None:
    events, report = read_events(TAOBAO_100, "taobao", sort=False, dedupe=False)
    raw = raw_taobao_types()
    assert names(events) == [canonical(t) for t in raw]
    assert Counter(names(events)) == {"view": raw.count("pv"), "cart": raw.count("cart"),
                                      "favorite": raw.count("fav"), "purchase": raw.count("buy")}
    assert report.type_aliases_applied == {"pv": "view", "fav": "favorite", "buy": "purchase"}
    assert "event types renamed: " in report.summary() and "pv→view" in report.summary()
    # Chunk by chunk, each chunk with its own dictionary: the same names, every chunk distinct.
    chunks = list(iter_event_chunks(TAOBAO_100, "taobao", chunk_rows=997))
    assert len(chunks) > 5
    for c in chunks:
        assert set(c.event_types) <= set(CANONICAL)
        assert_distinct_dictionary(c)
    assert names(Events.concat(chunks)) == names(events)


def test_retailrocket_names_come_out_canonical(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("timestamp,visitorid,event,itemid,transactionid\n"
                    "1433221332117,257597,view,355908,\n"
                    "1433224214164,992329,addtocart,248676,\n"
                    "1433224214999,992329,transaction,248676,4000\n")
    events, report = read_events(path, sort=False)
    assert report.format == "retailrocket"
    assert names(events) == ["view", "cart", "purchase"]
    assert report.type_aliases_applied == {"addtocart": "cart", "transaction": "purchase"}


def test_rees46_names_are_canonical_already() -> None:
    events, report = read_events(REES46_SLICE, sort=False, dedupe=False)
    assert report.format == "rees46" and set(events.event_types) == {"view", "cart", "purchase"}
    assert report.type_aliases_applied == {}
    assert "renamed" not in report.summary()


OTTO_TMALL = [  # OTTO and Tmall spellings, a deployment's own name, and an unknown type
    ("u1", "clicks"), ("u1", "carts"), ("u1", "orders"), ("u2", "0"), ("u2", "1"), ("u2", "3"), ("u2", "2"),
    ("u3", "Checkout"), ("u3", "login"), ("u3", "click"),
]
WANT = ["view", "cart", "purchase", "view", "cart", "favorite", "purchase", "purchase", "login", "view"]


def records() -> list[dict[str, object]]:
    return [{"event_id": f"e{i}", "user_id": u, "event_type": t, "timestamp": T0 + 1000 * i}
            for i, (u, t) in enumerate(OTTO_TMALL)]


def write_generic(path: Path, fmt: str) -> Path:
    rows = records()
    if fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, ["event_id", "user_id", "event_type", "timestamp"])
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    else:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_generic_files_with_otto_and_tmall_names(tmp_path: Path, fmt: str) -> None:
    path = write_generic(tmp_path / f"events.{fmt}", fmt)
    events, report = read_events(path, sort=False, aliases={"checkout": "purchase"})
    assert report.format == fmt
    assert names(events) == WANT
    assert_distinct_dictionary(events)
    assert set(events.event_types) == {"view", "cart", "purchase", "favorite", "login"}
    assert report.type_aliases_applied == {"clicks": "view", "carts": "cart", "orders": "purchase", "0": "view",
                                           "1": "cart", "3": "favorite", "2": "purchase", "Checkout": "purchase",
                                           "click": "view"}
    # Without the deployment's alias, its name passes through as it is.
    plain, _ = read_events(path, sort=False)
    assert names(plain)[7] == "Checkout"
    # The chunked reader renames as the whole-file one does; each chunk's dictionary is distinct.
    chunks = list(iter_event_chunks(path, chunk_rows=3, aliases={"checkout": "purchase"}))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert names(Events.concat(chunks)) == WANT
    # The replay stream keeps the file's own names: the service maps them.
    assert [r["event_type"] for recs in iter_records(path) for r in recs] == [t for _, t in OTTO_TMALL]


def test_tmall_numeric_codes_in_an_integer_column(tmp_path: Path) -> None:
    table = pa.table({"user_id": ["u"] * 5, "event_type": pa.array([0, 1, 2, 3, 0], pa.int8()),
                      "timestamp": pa.array(T0 + np.arange(5), pa.int64())})
    pq.write_table(table, tmp_path / "tmall.parquet")
    events, report = read_events(tmp_path / "tmall.parquet", sort=False)
    assert names(events) == ["view", "cart", "purchase", "favorite", "view"]
    assert report.type_aliases_applied == {"0": "view", "1": "cart", "2": "purchase", "3": "favorite"}


def test_two_raw_names_of_one_type_share_its_code(tmp_path: Path) -> None:
    rows = [("u1", "pv"), ("u1", "view"), ("u1", "click"), ("u1", "PV"), ("u2", "buy"), ("u2", "transaction")]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"user_id": u, "event_type": t, "timestamp": T0 + i}) + b"\n"
                              for i, (u, t) in enumerate(rows)))
    events, report = read_events(path, sort=False)
    assert sorted(events.event_types) == ["purchase", "view"]
    view, purchase = events.event_types.index("view"), events.event_types.index("purchase")
    assert events.event_type.tolist() == [view] * 4 + [purchase] * 2
    assert report.type_aliases_applied == {"pv": "view", "click": "view", "PV": "view", "buy": "purchase",
                                           "transaction": "purchase"}
    # Rows that differ only in the spelling of their type are the same event once renamed.
    twice = tmp_path / "twice.jsonl"
    twice.write_bytes(b'{"user_id": "u", "event_type": "pv", "timestamp": 1700000000005}\n'
                      b'{"user_id": "u", "event_type": "view", "timestamp": 1700000000005}\n')
    deduped, rep = read_events(twice)
    assert len(deduped) == 1 and rep.duplicates_dropped == 1


# ---- the service's setting and the bundle -----------------------------------------------------


def test_event_aliases_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQGUARD_EVENT_ALIASES", '{"checkout": "purchase", "signin": "login"}')
    assert Settings().event_aliases == {"checkout": "purchase", "signin": "login"}
    for bad in ('{"checkout": ""}', '{" ": "view"}', '["checkout"]', '{"checkout": 3}', "checkout=purchase"):
        monkeypatch.setenv("SEQGUARD_EVENT_ALIASES", bad)
        with pytest.raises((ValidationError, ValueError)):
            Settings()
    monkeypatch.delenv("SEQGUARD_EVENT_ALIASES")
    assert Settings().event_aliases == {}


def test_bundle_takes_a_deployments_aliases() -> None:
    bundle = load_bundle()
    assert bundle.with_aliases({}) is bundle and bundle.with_aliases(None) is bundle
    spec = bundle.spec
    assert set(spec.event_types) <= set(CANONICAL)  # the default bundle is trained on canonical names
    assert spec.aliases["pv"] == "view"  # its table travels in bundle.json
    aliased = bundle.with_aliases({"Checkout": "purchase"})
    assert aliased.meta is bundle.meta and aliased.version == bundle.version
    ids = aliased.spec.type_ids(["checkout", "CHECKOUT", "purchase", "buy", "transaction", "login"])
    purchase = spec.type_ids(["purchase"])[0]
    assert ids.tolist() == [purchase] * 5 + [1]
    assert spec.type_ids(["checkout"]).tolist() == [1]  # the loaded bundle itself is unchanged


# ---- hostile and careless input (review of the alias table and the unknown-type metric) ------


def test_an_alias_type_is_read_in_the_table_before_the_deployments_aliases() -> None:
    swap = build_aliases({"view": "purchase", "purchase": "view"})
    assert (swap["view"], swap["purchase"]) == ("purchase", "view")  # a swap is a swap, not a no-op
    chain = build_aliases({"a": "b", "b": "buy"})
    assert (chain["a"], chain["b"]) == ("b", "purchase")  # b is read as the table knew it: no chains
    assert build_aliases({"b": "buy", "a": "b"}) == chain  # whatever the order of the entries
    # The table a bundle carries, put on top of the project's again (as `seqguard score` reads
    # a file through it), is the same table.
    table = build_aliases({"view": "purchase", "checkout": "view", "signin": "login"})
    assert build_aliases(table) == table


def test_one_name_twice_with_different_types_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_aliases({"Checkout": "buy", "checkout": "purchase"})["checkout"] == "purchase"  # same type: fine
    with pytest.raises(ValueError, match="contradicts"):
        build_aliases({"Checkout": "purchase", "checkout": "view"})
    assert parse_alias_pairs(["checkout=buy", "CHECKOUT=Buy"]) == {"checkout": "Buy"}
    with pytest.raises(ValueError, match="'checkout' is already aliased to 'purchase'"):
        parse_alias_pairs(["checkout=purchase", " Checkout =view"])
    monkeypatch.setenv("SEQGUARD_EVENT_ALIASES", '{"Checkout": "purchase", "checkout": "view"}')
    with pytest.raises(ValidationError, match="contradicts"):
        Settings()


def test_alias_warnings_name_what_changes() -> None:
    from app.core.vocabulary import alias_warnings

    assert alias_warnings({"checkout": "buy", "Clicks": "view"}, known_types=CANONICAL) == []
    assert alias_warnings({"view": "purchase", "pv": "cart", "signin": "login"}, known_types=CANONICAL) == [
        "alias view → purchase replaces view → view",
        "alias pv → cart replaces pv → view",
        "alias signin → login: not among the model's event types",
    ]
    assert alias_warnings({"signin": "login"}) == []  # training: a new type is what it is for
    assert alias_warnings({"x\x1b[2J": "y\n"}) == []  # nothing to say; and when there is, printable:
    assert alias_warnings({"x\x1b[2J": "y\nz"}, known_types=CANONICAL) == [
        "alias x\\x1b[2J → y\\nz: not among the model's event types"]


def test_unknown_type_labels_and_warnings_are_safe(caplog: pytest.LogCaptureFixture) -> None:
    from app.metrics import Metrics

    m = Metrics()
    hostile = ["a\r\nseqguard_fake_total 1", "\x1b[31mred", "nul\x00", "视图", "'$(touch /tmp/pwned)'"]
    m.track_unknown_types({name: 1 for name in hostile})
    body = m.render()[0].decode()
    series = [line for line in body.split("\n") if line.startswith("seqguard_unknown_event_types_total{")]
    assert len(series) == len(hostile)
    assert not any(c in body for c in "\r\x1b\x00")  # no raw control character in the exposition
    assert "seqguard_fake_total" not in [line.split(" ")[0] for line in body.split("\n")]
    assert 'event_type="视图"' in body and 'event_type="\\\\x1b[31mred"' in body
    warned = [r.getMessage() for r in caplog.records if r.name == "seqguard.vocabulary"]
    assert len(warned) == len(hostile)
    # The suggested setting, pasted into a shell, is the setting: never a command.
    import shlex

    line = warned[-1]
    suggestion = line[line.index("SEQGUARD_EVENT_ALIASES=") + len("SEQGUARD_EVENT_ALIASES="):line.index(" (seqguard")]
    assert shlex.split(suggestion) == ['{"\'$(touch /tmp/pwned)\'": "TYPE"}']
