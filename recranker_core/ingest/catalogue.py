"""The batch's item and user files: staged by a worker thread while the merge inserts the rows,
then upserted into recranker.items and recranker.users, with the ids merged rows name that the
tables lack."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from recranker_core.datasets.sources import SourceFile, read_items, read_users
from recranker_core.db.connect import connect
from recranker_core.ingest.staging import _create_table, _StagingNames
from recranker_core.ingest.timing import _exec


@dataclass(frozen=True)
class _Catalogue:
    """The batch's item and user files as staged: how many rows each had, and the ids of each
    (upserted from the files, so rows naming them need not create them)."""

    items: int = 0
    users: int = 0
    item_ids: frozenset[str] = frozenset()
    user_ids: frozenset[str] = frozenset()

    def new(self, which: str, ids: list[str]) -> list[str]:
        known = self.user_ids if which == "users" else self.item_ids
        return [i for i in ids if i not in known]


class _CatalogueStaging:
    """The batch's item and user files (small, but read row by row) staged by a worker thread on
    its own connection while the merge inserts the rows. The item file is read first, here: the
    classification needs its ids. The tables are marked as the ingest session's, so that another
    ingest's sweep leaves them alone while it lives."""

    def __init__(self, database_url: str, src: SourceFile, names: _StagingNames, owner: int):
        self._items = read_items(src.items_path) if src.items_path is not None else None
        self.item_ids = frozenset(i.item_id for i in self._items or ())
        self._done: _Catalogue | None = None
        self._error: BaseException | None = None

        def stage() -> None:
            try:
                with connect(
                    database_url, autocommit=True, application_name="recranker-ingest"
                ) as conn:
                    self._done = _stage_catalogue(conn, src, names, self._items, owner)
            except BaseException as exc:  # noqa: BLE001 - handed to the ingest's thread
                self._error = exc

        self._thread = threading.Thread(target=stage, name="recranker-catalogue", daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def result(self) -> _Catalogue:
        """The staged catalogue; the user file's DataError, if it could not be read."""
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._done is not None
        return self._done

    def wait(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()


def _stage_catalogue(
    conn: psycopg.Connection,
    src: SourceFile,
    names: _StagingNames,
    items: list[Any] | None,
    owner: int,
) -> _Catalogue:
    """Stage the batch's item and user files, so rows can refer to items they add."""
    n_users = 0
    user_ids: frozenset[str] = frozenset()
    with conn.transaction():
        if items is not None:
            _create_table(
                conn,
                names.items,
                sql.SQL(
                    "item_id text PRIMARY KEY, title text, year integer, genres text[], "
                    "attributes jsonb"
                ),
                owner,
            )
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} FROM STDIN").format(_StagingNames.ident(names.items))
                ) as copy,
            ):
                for it in {i.item_id: i for i in items}.values():
                    copy.write_row(
                        (it.item_id, it.title, it.year, it.genres, json.dumps(it.attributes))
                    )
        if src.users_path is not None:
            users = read_users(src.users_path)
            _create_table(
                conn, names.users, sql.SQL("user_id text PRIMARY KEY, attributes jsonb"), owner
            )
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} FROM STDIN").format(_StagingNames.ident(names.users))
                ) as copy,
            ):
                by_id = {u.user_id: u for u in users}
                for us in by_id.values():
                    copy.write_row((us.user_id, json.dumps(us.attributes)))
            n_users = len(users)
            user_ids = frozenset(by_id)
    item_ids = frozenset(i.item_id for i in items or ())
    return _Catalogue(len(items or ()), n_users, item_ids, user_ids)


def _upsert_items(
    conn: psycopg.Connection,
    names: _StagingNames,
    has_items: bool,
    classified: sql.Composable,
    batch_id: int,
    auto_create: bool,
    merged_ids: list[str] | None,
) -> int:
    n = 0
    if has_items:
        n += _exec(
            conn,
            sql.SQL("""INSERT INTO recranker.items
                           (item_id, title, year, genres, attributes, first_batch_id)
                       SELECT item_id, title, year, coalesce(genres, '{{}}'), attributes, %s
                       FROM {} ORDER BY item_id
                       ON CONFLICT (item_id) DO UPDATE
                       SET title = EXCLUDED.title, year = EXCLUDED.year,
                           genres = EXCLUDED.genres, attributes = EXCLUDED.attributes,
                           updated_at = now()
                       WHERE (items.title, items.year, items.genres, items.attributes)
                             IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.year, EXCLUDED.genres,
                                               EXCLUDED.attributes)""").format(
                _StagingNames.ident(names.items)
            ),
            (batch_id,),
        ).rowcount
    if auto_create:
        n += _insert_new_ids(conn, "items", "item_id", classified, batch_id, merged_ids)
    return n


def _insert_new_ids(
    conn: psycopg.Connection,
    table: str,
    column: str,
    classified: sql.Composable,
    batch_id: int,
    merged_ids: list[str] | None,
) -> int:
    """Create the users or items that merged rows name and the table does not have yet. The ids
    come from classification when no row changed outcome since (no scan of the staged rows),
    less those the batch's own files just upserted."""
    target = sql.Identifier("recranker", table)
    col = sql.Identifier(column)
    if merged_ids is not None:
        if not merged_ids:
            return 0
        return _exec(
            conn,
            sql.SQL("""INSERT INTO {table} ({col}, first_batch_id)
                       SELECT v, %s::bigint FROM unnest(%s::text[]) v
                       ON CONFLICT ({col}) DO NOTHING""").format(table=target, col=col),
            (batch_id, merged_ids),
        ).rowcount
    return _exec(
        conn,
        sql.SQL("""INSERT INTO {table} ({col}, first_batch_id)
                   SELECT DISTINCT {col}, %s::bigint FROM {c} WHERE outcome = 'merge'
                   ON CONFLICT ({col}) DO NOTHING""").format(table=target, col=col, c=classified),
        (batch_id,),
    ).rowcount


def _upsert_users(
    conn: psycopg.Connection,
    names: _StagingNames,
    has_users: bool,
    classified: sql.Composable,
    batch_id: int,
    merged_ids: list[str] | None,
) -> int:
    n = 0
    if has_users:
        n += _exec(
            conn,
            sql.SQL("""INSERT INTO recranker.users (user_id, attributes, first_batch_id)
                       SELECT user_id, attributes, %s FROM {} ORDER BY user_id
                       ON CONFLICT (user_id) DO UPDATE
                       SET attributes = EXCLUDED.attributes, updated_at = now()
                       WHERE users.attributes IS DISTINCT FROM EXCLUDED.attributes""").format(
                _StagingNames.ident(names.users)
            ),
            (batch_id,),
        ).rowcount
    return n + _insert_new_ids(conn, "users", "user_id", classified, batch_id, merged_ids)
