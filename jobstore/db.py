"""Engine, sessions and migrations (Alembic, applied on start)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_folder(url: str) -> None:
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _sqlite_folder(url)
        # JSON as UTF-8 text: SQLite's JSON paths (?metadata[key]= filters) match a key only as written unescaped.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               json_serializer=partial(json.dumps, ensure_ascii=False))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _):
            # The API and the worker are separate processes writing the same file.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")

        return engine
    # connect_timeout: /readyz must answer even when the database host does not.
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})


@lru_cache
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def new_session(url: str) -> Session:
    """A session on the URL's engine (created once per process); it connects on its first query."""
    return _session_factory(url)()


def autocommit(session: Session) -> None:
    """Run the session's statements each in its own transaction, for work that only reads: on
    PostgreSQL it saves the BEGIN and COMMIT round trips. Call it before the first statement; the
    connection is reset when it goes back to the pool."""
    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    session = new_session(url)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the database schema to the newest revision."""
    _sqlite_folder(url)
    command.upgrade(_alembic_config(url), "head")


class SchemaNotCurrent(RuntimeError):
    """The database is not at the revision this code needs (its migrations were not applied)."""


def check_schema(url: str) -> None:
    """Raise SchemaNotCurrent unless the database is at the newest revision; reads, never writes."""
    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head()
    with get_engine(url).connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        raise SchemaNotCurrent(f"the database schema is at revision {current or 'none (empty database)'}, this code "
                               f"needs {head}: run `python -m api.manage migrate` (compose: the migrate service) first")
