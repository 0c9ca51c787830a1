"""Helpers for the web tests: a client over a mined data directory, the CSRF token of a page,
and the SQL a request ran (to check that pages read through indexes, never whole tables)."""
from __future__ import annotations

import re
from contextlib import contextmanager

from sqlalchemy import event

from app.db import engine_for

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def csrf_from(html: str) -> str:
    return CSRF.search(html).group(1)


def form_token(client, url: str = "/") -> str:
    """Load a page as a browser would (which sets the CSRF cookie) and return its form token."""
    return csrf_from(client.get(url).text)


@contextmanager
def captured_sql(settings):
    statements: list[tuple[str, object]] = []
    engine = engine_for(settings.db_url)

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


BIG_TABLES = ("patches", "cluster_members", "image_scores", "images", "image_labels", "clusters")


def full_scans(settings, statements) -> list[str]:
    """Statements whose SQLite plan scans a big table whole (no index)."""
    bad = []
    with engine_for(settings.db_url).connect() as conn:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            for row in plan:
                detail = row[-1]
                match = re.match(r"SCAN (\w+)", detail)
                if match and match.group(1) in BIG_TABLES and "COVERING INDEX" not in detail \
                        and "USING INDEX" not in detail:
                    bad.append(f"{detail} :: {statement}")
    return bad
