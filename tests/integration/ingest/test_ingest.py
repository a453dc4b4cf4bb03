"""Ingest against a real PostgreSQL: every row ends merged, duplicate or quarantined with its
reasons, counts add up, bad files get clear errors, and re-runs are no-ops."""

from __future__ import annotations

from pathlib import Path

import psycopg

from recranker_core.config import Settings
from recranker_core.datasets.sources import describe_file
from recranker_core.ingest import IngestResult, ingest_outcome

HEADER = "user_id,item_id,rating,timestamp\n"
ITEMS = (
    'item_id,title,year,genres\ni1,One,1999,Drama|Comedy\ni2,Two,,\ni3,"Three, the",2001,Action\n'
)


def write(directory: Path, name: str, body: str | bytes, items: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    if items:
        (directory / "items.csv").write_text(ITEMS)
    return path


def run(path: Path, settings: Settings, url: str, fmt: str | None = None) -> IngestResult:
    """Ingest and return the result, rejected or not."""
    return ingest_outcome(describe_file(path, fmt), settings, url)


def lenient(settings: Settings) -> Settings:
    """Settings whose failure budget lets a small file with a few bad rows merge."""
    return settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"failure_budget": 0.9})}
    )


def check_accounting(url: str, result: IngestResult) -> None:
    """The ledger, quarantine and interactions agree with the result, and the counts add up."""
    assert result.rows_read == result.rows_merged + result.rows_duplicate + result.rows_quarantined
    with psycopg.connect(url) as conn:
        ledger = conn.execute(
            "SELECT status, rows_read, rows_merged, rows_duplicate, rows_quarantined "
            "FROM recranker.ingest_batches WHERE batch_id = %s",
            (result.batch_id,),
        ).fetchone()
        quarantined = conn.execute(
            "SELECT count(*) FROM recranker.quarantine WHERE batch_id = %s", (result.batch_id,)
        ).fetchone()
        merged = conn.execute(
            "SELECT count(*) FROM recranker.interactions WHERE batch_id = %s", (result.batch_id,)
        ).fetchone()
        staging_left = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'recranker_staging'"
        ).fetchone()
    assert ledger == (
        result.status,
        result.rows_read,
        result.rows_merged,
        result.rows_duplicate,
        result.rows_quarantined,
    )
    assert quarantined == (result.rows_quarantined,)
    assert merged == (result.rows_merged,)
    assert staging_left == (0,)


def quarantine_of(url: str, batch_id: int | None) -> dict[int, list[str]]:
    with psycopg.connect(url) as conn:
        return {
            line: reasons
            for line, reasons in conn.execute(
                "SELECT line, reasons FROM recranker.quarantine WHERE batch_id = %s ORDER BY line",
                (batch_id,),
            )
        }


def test_clean_file_merges_and_rerun_is_noop(tmp_path: Path, settings: Settings, clean_db: str):
    path = write(
        tmp_path, "a.csv", HEADER + "u1,i1,5,1000000000\nu1,i2,3,1000000001\nu2,i3,4,1000000003\n"
    )
    first = run(path, settings, clean_db)
    assert (first.status, first.rows_read, first.rows_merged) == ("merged", 3, 3)
    assert first.items_upserted == 3 and first.users_upserted == 2
    check_accounting(clean_db, first)
    again = run(path, settings, clean_db)
    assert again.status == "already_ingested" and again.batch_id == first.batch_id
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT count(*) FROM recranker.ingest_batches").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM recranker.interactions").fetchone() == (3,)
        title, genres = conn.execute(
            "SELECT title, genres FROM recranker.items WHERE item_id = 'i3'"
        ).fetchone()
    assert (title, genres) == ("Three, the", ["Action"])


def test_empty_file_is_rejected_with_reason(tmp_path: Path, settings: Settings, clean_db: str):
    result = run(write(tmp_path, "empty.csv", b""), settings, clean_db)
    assert result.status == "rejected" and "empty" in (result.error or "")
    assert "empty.csv" in (result.error or "")
    check_accounting(clean_db, result)


def test_header_only_is_rejected(tmp_path: Path, settings: Settings, clean_db: str):
    result = run(write(tmp_path, "h.csv", HEADER), settings, clean_db)
    assert result.status == "rejected" and "no data rows" in (result.error or "")
    check_accounting(clean_db, result)


def test_missing_column_names_file_line_and_field(tmp_path, settings, clean_db):
    path = write(tmp_path, "m.csv", "user_id,item_id,timestamp\nu1,i1,1000000000\n")
    result = run(path, settings, clean_db)
    assert result.status == "rejected"
    assert "m.csv, line 1" in (result.error or "") and "'rating'" in (result.error or "")


def test_extra_header_columns_are_ignored(tmp_path, settings, clean_db):
    path = write(
        tmp_path, "x.csv", "user_id,item_id,rating,timestamp,device\nu1,i1,4,1000000000,tv\n"
    )
    result = run(path, settings, clean_db)
    assert (result.status, result.rows_merged) == ("merged", 1)


def test_structural_errors_are_quarantined_per_line(tmp_path, settings, clean_db):
    body = (
        HEADER.encode()
        + b"u1,i1,5,1000000000\n"
        + b"u1,i2,5,1000000001,extra\n"  # line 3: too many fields
        + b"u1,i3\n"  # line 4: too few
        + b"u\xff\xfe,i1,4,1000000002\n"  # line 5: not UTF-8
        + b'u2,"i1,4,1000000003\n'  # line 6: unbalanced quote
        + b"\n"  # line 7: empty
        + b"u3,i1,"  # line 8: truncated last line, no newline
    )
    result = run(write(tmp_path, "s.csv", body), lenient(settings), clean_db)
    assert result.status == "merged" and result.rows_read == 7 and result.rows_merged == 1
    assert quarantine_of(clean_db, result.batch_id) == {
        3: ["wrong_field_count"],
        4: ["wrong_field_count"],
        5: ["invalid_utf8"],
        6: ["malformed_csv"],
        7: ["empty_line"],
        8: ["wrong_field_count"],
    }
    check_accounting(clean_db, result)


def test_value_errors_are_quarantined_with_every_reason(tmp_path, settings, clean_db):
    long_id = "u" * 1024
    body = (
        HEADER
        + "\n".join(
            [
                "u1,i1,5,1000000000",  # 2 ok
                "u1,i2,abc,1000000001",  # 3
                "u1,i3,0,1000000002",  # 4
                "u1,i1,6,1000000003",  # 5
                "u1,i2,NaN,1000000004",  # 6
                "u1,i3,inf,1000000005",  # 7
                "u1,i1,4,yesterday",  # 8
                "u1,i2,4,99999999999",  # 9 (year 5138)
                "u1,i3,4,-86400",  # 10 (1969)
                f"{long_id},i1,4,1000000006",  # 11
                ",i1,4,1000000007",  # 12
                "u1,nope,4,1000000008",  # 13
                "u1,i1,,",  # 14
                "u1,i2,4.5,2003-02-30T10:00:00Z",  # 15 (no such day)
                "u1,i2,4.5,2003-02-03T10:00:00Z",  # 16 ok, ISO
            ]
        )
        + "\n"
    )
    result = run(write(tmp_path, "v.csv", body), lenient(settings), clean_db)
    assert result.status == "merged" and result.rows_read == 15 and result.rows_merged == 2
    assert quarantine_of(clean_db, result.batch_id) == {
        3: ["rating_not_numeric"],
        4: ["rating_out_of_range"],
        5: ["rating_out_of_range"],
        6: ["rating_not_finite"],
        7: ["rating_not_finite"],
        8: ["timestamp_invalid"],
        9: ["timestamp_in_future"],
        10: ["timestamp_too_old"],
        11: ["user_id_too_long"],
        12: ["user_id_missing"],
        13: ["item_unknown"],
        14: ["rating_missing", "timestamp_missing"],
        15: ["timestamp_invalid"],
    }
    check_accounting(clean_db, result)
    # GX saw the same rows as the split: each expectation's failures match the reasons.
    by_expectation = {
        (v["expectation"], v["column"]): v
        for v in result.validation
        if v["suite"] == "staged_batch"
    }
    assert by_expectation[("expect_column_values_to_be_between", "rating")]["unexpected_count"] == 2
    assert (
        by_expectation[("expect_column_values_to_be_in_set", "item_known")]["unexpected_count"] == 1
    )
    assert (
        by_expectation[("expect_column_value_lengths_to_be_between", "user_id")]["unexpected_count"]
        == 1
    )


def test_awkward_ids_are_stored_verbatim(tmp_path, settings, clean_db):
    ids = ['o"brien', "a,b", "x'); DROP TABLE recranker.interactions;--", "é ü 漢字", "\\N"]
    rows = "".join(
        '"{}",i1,4,{}\n'.format(uid.replace('"', '""'), 1000000000 + n) for n, uid in enumerate(ids)
    )
    result = run(write(tmp_path, "ids.csv", HEADER + rows), settings, clean_db)
    assert (result.status, result.rows_merged) == ("merged", len(ids))
    with psycopg.connect(clean_db) as conn:
        stored = {r[0] for r in conn.execute("SELECT user_id FROM recranker.interactions")}
    assert stored == set(ids)


def test_duplicates_within_and_across_files(tmp_path, settings, clean_db):
    first = write(
        tmp_path / "a",
        "day1.csv",
        HEADER + "u1,i1,5,1000000000\nu1,i1,5,1000000000\nu1,i2,3,1000000001\n",
    )
    r1 = run(first, settings, clean_db)
    assert (r1.rows_merged, r1.rows_duplicate, r1.rows_quarantined) == (2, 1, 0)
    second = write(
        tmp_path / "b",
        "day2.csv",
        HEADER
        + "u1,i1,5,1000000000\n"  # same as day 1: duplicate
        + "u1,i2,4,1000000001\n"  # day 1 said 3: conflict
        + "u2,i3,2,1000000005\nu2,i3,1,1000000005\n"  # conflicting pair within the file
        + "u2,i1,4,1000000009\n",
    )
    r2 = run(second, lenient(settings), clean_db)
    assert (r2.rows_read, r2.rows_merged, r2.rows_duplicate, r2.rows_quarantined) == (5, 1, 1, 3)
    assert quarantine_of(clean_db, r2.batch_id) == {
        3: ["conflicts_with_existing"],
        4: ["conflicting_duplicate_in_batch"],
        5: ["conflicting_duplicate_in_batch"],
    }
    check_accounting(clean_db, r2)


def test_over_budget_rejects_whole_batch_and_keeps_every_row(tmp_path, settings, clean_db):
    good = "".join(f"u{n},i1,4,{1000000000 + n}\n" for n in range(18))
    bad = "u99,i1,9,1000000000\nu98,i1,-1,1000000000\n"
    result = run(write(tmp_path, "r.csv", HEADER + good + bad), settings, clean_db)
    assert result.status == "rejected" and result.rows_merged == 0
    assert result.rows_quarantined == result.rows_read == 20
    assert "10.0% of 20 rows are bad" in (result.error or "")
    assert "failure budget of 5.0%" in (result.error or "")
    reasons = quarantine_of(clean_db, result.batch_id)
    assert sum(r == ["batch_rejected"] for r in reasons.values()) == 18
    assert reasons[20] == ["rating_out_of_range"]
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT count(*) FROM recranker.interactions").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM recranker.users").fetchone() == (0,)
    check_accounting(clean_db, result)
    # A rejected batch does not block a retry with a larger budget.
    retry = run(tmp_path / "r.csv", lenient(settings), clean_db)
    assert (retry.status, retry.rows_merged) == ("merged", 18)


def test_unknown_items_created_when_asked(tmp_path, settings, clean_db):
    path = write(tmp_path, "n.csv", HEADER + "u1,new1,4,1000000000\n", items=False)
    assert run(path, settings, clean_db).status == "rejected"
    auto = settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"auto_create_items": True})}
    )
    result = run(path, auto, clean_db)
    assert (result.status, result.rows_merged, result.items_upserted) == ("merged", 1, 1)


def test_parquet_and_tsv_sources(tmp_path, settings, clean_db):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tsv = write(tmp_path, "t.tsv", "user_id\titem_id\trating\ttimestamp\nu1\ti1\t4\t1000000000\n")
    assert run(tsv, settings, clean_db).rows_merged == 1
    table = pa.table(
        {
            "user_id": ["u1", "u2", None],
            "item_id": ["i2", "i3", "i1"],
            "rating": [5.0, 7.0, 3.0],
            "timestamp": pa.array(
                [1_000_000_000_000_000, 1_000_000_001_000_000, 1_000_000_002_000_000],
                pa.timestamp("us", "UTC"),
            ),
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    result = run(tmp_path / "p.parquet", lenient(settings), clean_db)
    assert (result.rows_read, result.rows_merged, result.rows_quarantined) == (3, 1, 2)
    assert quarantine_of(clean_db, result.batch_id) == {
        2: ["rating_out_of_range"],
        3: ["user_id_missing"],
    }
    with psycopg.connect(clean_db) as conn:
        ts = conn.execute(
            "SELECT extract(epoch FROM event_ts) FROM recranker.interactions WHERE user_id='u1' "
            "AND item_id='i2'"
        ).fetchone()
    assert ts is not None and float(ts[0]) == 1_000_000_000.0


def test_stray_quotes_in_line_formats_are_data_one_line_one_row(tmp_path, settings, clean_db):
    # 102 lines, two with an unbalanced `"`: with CSV quoting they would fuse into one row whose
    # user_id holds a tab and a newline. MovieLens atomic files and TSV have no quoting.
    lines = [(f"u{n}", f"i{1 + n % 3}", str(1 + n % 5), str(882_100_000 + n)) for n in range(100)]
    lines[40] = ('"ua', "i1", "4", "882100000")
    lines[41] = ('ub"', "i2", "3", "882100001")
    lines += [('"', "i3", "5", "882100002"), ('u"q"', "i3", "2", "882100003")]
    body = "".join("\t".join(fields) + "\n" for fields in lines)
    atomic = tmp_path / "ml"
    atomic.mkdir()
    (atomic / "day.item").write_text(
        "item_id:token\tmovie_title:token_seq\ni1\tOne\ni2\tTwo\ni3\tThree\n"
    )
    (atomic / "day.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + body
    )
    tsv = write(tmp_path / "tsv", "day.tsv", "user_id\titem_id\trating\ttimestamp\n" + body)
    for path, fmt in ((atomic / "day.inter", "movielens"), (tsv, None)):
        clean = psycopg.connect(clean_db, autocommit=True)
        clean.execute("TRUNCATE recranker.interactions, recranker.users")
        clean.close()
        result = run(path, settings, clean_db, fmt)
        assert (result.status, result.rows_read, result.rows_merged) == ("merged", 102, 102), path
        check_accounting(clean_db, result)
        with psycopg.connect(clean_db) as conn:
            users = {r[0] for r in conn.execute("SELECT user_id FROM recranker.interactions")}
        assert {'"ua', 'ub"', '"', 'u"q"'} <= users and len(users) == 102


def test_ids_with_control_characters_or_padding_are_quarantined(tmp_path, settings, clean_db):
    # CSV keeps RFC 4180 quoting: a quoted field may hold a tab or a line break, and that id is
    # quarantined with its reason rather than stored.
    rows = [
        "u1,i1,4,1000000000",  # 2 ok
        '"u\t2",i1,4,1000000001',  # 3
        '"u\r3",i1,4,1000000002',  # 4
        'u4,"i\x1f1",4,1000000003',  # 5
        "u5\x7f,i1,4,1000000004",  # 6
        "u6\u0085,i1,4,1000000005",  # 7 (C1 control NEL)
        " u7,i1,4,1000000006",  # 8
        "u8 ,i1,4,1000000007",  # 9
        "u9,i1 ,4,1000000008",  # 10
        "u 10,i1, 4 , 1000000009 ",  # 11 ok: inner space kept, values parsed
        "   ,i1,4,1000000010",  # 12 blank id: missing
        '"u\n12",i2,4,1000000011',  # 13-14: one CSV record over two lines
    ]
    result = run(
        write(tmp_path, "c.csv", HEADER + "\n".join(rows) + "\n"), lenient(settings), clean_db
    )
    assert (result.status, result.rows_read, result.rows_merged) == ("merged", 12, 2)
    assert quarantine_of(clean_db, result.batch_id) == {
        3: ["user_id_control_character"],
        4: ["user_id_control_character"],
        5: ["item_id_control_character"],
        6: ["user_id_control_character"],
        7: ["user_id_control_character"],
        8: ["user_id_whitespace"],
        9: ["user_id_whitespace"],
        10: ["item_id_whitespace"],
        12: ["user_id_missing"],
        13: ["user_id_control_character"],
    }
    check_accounting(clean_db, result)
    with psycopg.connect(clean_db) as conn:
        stored = {r[0] for r in conn.execute("SELECT user_id FROM recranker.interactions")}
        raw = conn.execute(
            "SELECT raw FROM recranker.quarantine WHERE batch_id = %s AND line = 3",
            (result.batch_id,),
        ).fetchone()
    assert stored == {"u1", "u 10"} and raw == ("u\t2,i1,4,1000000001",)
    gx = {
        (v["expectation"], v["column"]): v["unexpected_count"]
        for v in result.validation
        if v["suite"] == "staged_batch"
    }
    assert gx[("expect_column_values_to_not_match_regex", "user_id")] == 7
    assert gx[("expect_column_values_to_not_match_regex", "item_id")] == 2

    # TSV cannot quote a tab, but may hold other control characters; the byte 0x01 (the quote
    # character COPY is told to use for line formats) sends the file through the line reader.
    tsv = write(
        tmp_path / "t",
        "t.tsv",
        "user_id\titem_id\trating\ttimestamp\n"
        "v1\ti1\t4\t1000000000\nv\x012\ti1\t4\t1000000001\nv3\x0b\ti1\t4\t1000000002\n",
    )
    result = run(tsv, lenient(settings), clean_db)
    assert (result.rows_read, result.rows_merged) == (3, 1)
    assert quarantine_of(clean_db, result.batch_id) == {
        3: ["user_id_control_character"],
        4: ["user_id_control_character"],
    }
    check_accounting(clean_db, result)


def test_trailing_blank_lines_are_not_rows_and_an_end_of_data_line_loses_nothing(
    tmp_path, settings, clean_db
):
    good = "".join(f"u{n},i1,4,{1000000000 + n}\n" for n in range(20))
    result = run(write(tmp_path, "b.csv", HEADER + good + "\n \n\r\n\n"), settings, clean_db)
    assert (result.status, result.rows_read, result.rows_merged) == ("merged", 20, 20)
    assert result.trailing_blank_lines == 4
    check_accounting(clean_db, result)
    # A blank line inside the data is a row, and quarantined.
    inner = HEADER + "u1,i1,4,1000000100\n\nu2,i1,4,1000000101\n\n"
    result = run(write(tmp_path / "m", "m.csv", inner), lenient(settings), clean_db)
    assert (result.rows_read, result.rows_merged, result.trailing_blank_lines) == (3, 2, 1)
    assert quarantine_of(clean_db, result.batch_id) == {3: ["empty_line"]}
    # COPY (PostgreSQL < 18) would end the data at a line holding only `\.` and drop the rest.
    for name, body in (
        ("e.csv", HEADER + "u1,i1,4,1000000200\n\\.\nu2,i1,4,1000000201\n"),
        ("e.tsv", HEADER.replace(",", "\t") + "u1\ti1\t4\t1000000200\n\\.\nu2\ti1\t4\t1000000201"),
    ):
        result = run(write(tmp_path / name, name, body), lenient(settings), clean_db)
        assert (result.rows_read, result.rows_merged + result.rows_duplicate) == (3, 2), name
        assert quarantine_of(clean_db, result.batch_id) == {3: ["wrong_field_count"]}
        check_accounting(clean_db, result)


def test_catalogue_ids_are_kept_exactly_or_the_file_is_refused(tmp_path, settings, clean_db):
    directory = tmp_path / "cat"
    directory.mkdir()
    (directory / "items.csv").write_text("item_id,title\ni1,One\n i2,Two\n")
    (directory / "day.csv").write_text(HEADER + "u1,i1,4,1000000000\n")
    result = run(directory / "day.csv", settings, clean_db)
    assert result.status == "rejected" and result.rows_merged == 0
    assert "items.csv, line 3: item_id ' i2'" in (result.error or "")
    check_accounting(clean_db, result)
