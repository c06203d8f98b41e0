"""The schema. Alembic migrations create it; this module describes it for queries.

Times are BIGINT microseconds since the epoch (UTC), money is BIGINT nano-dollars:
both exact and cheap to aggregate on either engine.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

# The sums a rollup row keeps (experiences and cost_rollups alike): counts, and sums kept
# as two BIGINT columns each, whole billions and the rest in 0..999,999,999, so that no
# column overflows however many of the largest events a caller may send (money as dollars
# and nanos; tokens, migration 0013, as billions and ones).
ROLLUP_COUNT_COLUMNS = ("event_count", "failed_event_count", "unpriced_event_count")
ROLLUP_MONEY = ("cost_input", "cost_output", "cost_total")
ROLLUP_TOKENS = ("input_tokens", "output_tokens")
ROLLUP_SPLIT: dict[str, tuple[str, str]] = {
    **{money: (f"{money}_dollars", f"{money}_nanos") for money in ROLLUP_MONEY},
    **{tokens: (f"{tokens}_billions", f"{tokens}_ones") for tokens in ROLLUP_TOKENS},
}
ROLLUP_SPLIT_COLUMNS = tuple(column for pair in ROLLUP_SPLIT.values() for column in pair)


class Uuid(sa.types.TypeDecorator[uuid.UUID]):
    """A UUID: PostgreSQL's uuid; on SQLite its 16 bytes, as a BLOB (migration 0017), where
    sa.Uuid stores 32 hex characters: the ids were a fifth of an event's bytes, counted
    twice more in the indexes that carry them.

    The SQLite columns keep the CHAR(32) type migrations 0001-0016 declared: SQLite stores a
    blob as it is given whatever a column's declared type, and renaming the type would mean
    copying every table, and dropping `experiences` cascades to their outcomes and steps."""

    impl = sa.Uuid
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.CHAR(32))
        return dialect.type_descriptor(sa.Uuid())

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return (value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))).bytes

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> uuid.UUID | None:
        if value is None or dialect.name != "sqlite":
            return value  # type: ignore[no-any-return]
        return uuid.UUID(bytes=bytes(value))


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

experience_types = sa.Table(
    "experience_types",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    # The outcomes its runs are scored on (domain.outcomes.to_json); NULL: none declared.
    sa.Column("outcomes", sa.JSON, nullable=True),
)

experience_type_versions = sa.Table(
    "experience_type_versions",
    metadata,
    sa.Column("type_id", sa.Integer, sa.ForeignKey("experience_types.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
)

experiences = sa.Table(
    "experiences",
    metadata,
    sa.Column("id", Uuid, primary_key=True),
    sa.Column("type_id", sa.Integer, sa.ForeignKey("experience_types.id"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("properties", sa.JSON, nullable=False),
    # The rollup of the experience's events, kept by the ingest writer in the transaction
    # that stores them. Money is whole dollars plus nanos in 0..999,999,999: exact, and no
    # 64-bit column overflows below 9 trillion events of the largest cost an event may have.
    *(sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in ROLLUP_COUNT_COLUMNS),
    *(sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in ROLLUP_SPLIT_COLUMNS),
    sa.Column("latency_sum_ms", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("first_event_time_us", sa.BigInteger, nullable=True),
    sa.Column("last_event_time_us", sa.BigInteger, nullable=True),
    # Its events' latency histogram (domain.rollups: log-scaled buckets), packed
    # (domain.rollups.packed_histogram; NULL: no events). A row per bucket beside it took 26
    # bytes an event on SQLite until migration 0025.
    sa.Column("latency_buckets", sa.LargeBinary, nullable=True),
    sa.Index("ix_experiences_type_created", "type_id", "create_time_us", "id"),
    # The orderings of ListExperiences and the cost percentiles of GetExperienceTypeStats.
    sa.Index("ix_experiences_type_cost", "type_id", "cost_total_dollars", "cost_total_nanos", "id"),
    sa.Index("ix_experiences_type_version_cost", "type_id", "version", "cost_total_dollars", "cost_total_nanos", "id"),
    sa.Index("ix_experiences_type_events", "type_id", "event_count", "id"),
    sa.Index("ix_experiences_type_first_event", "type_id", "first_event_time_us"),
)

# The experiences of a type that have events, summed per version and UTC day of their first
# event (an experience moves when an earlier event arrives), and the histogram of their
# total costs (domain.rollups.cost_bucket): GetExperienceTypeStats reads these.
type_rollups = sa.Table(
    "type_rollups",
    metadata,
    sa.Column("type_id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("experience_count", sa.BigInteger, nullable=False),
    sa.Column("event_count", sa.BigInteger, nullable=False),
    sa.Column("unpriced_event_count", sa.BigInteger, nullable=False),
    sa.Column("cost_total_dollars", sa.BigInteger, nullable=False),
    sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
    sa.Column("failed_event_count", sa.BigInteger, nullable=False, server_default="0"),  # migration 0011
)
type_cost_buckets = sa.Table(
    "type_cost_buckets",
    metadata,
    sa.Column("type_id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("bucket", sa.SmallInteger, primary_key=True),
    sa.Column("experience_count", sa.BigInteger, nullable=False),
)

# The same experiences once scored (migration 0011): per version, day of the first event,
# declared outcome and verdict (domain.rollups: SUCCEEDED, FAILED, NO_GOAL), the runs, the
# sum of their values and of their costs, and their cost histogram; and per step, the runs
# with it and its events and cost. GetExperienceTypeStats' outcomes and steps, and
# CompareVersions, read these.
type_outcome_rollups = sa.Table(
    "type_outcome_rollups",
    metadata,
    sa.Column("type_id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("verdict", sa.SmallInteger, primary_key=True),
    sa.Column("run_count", sa.BigInteger, nullable=False),
    sa.Column("value_sum", sa.Float, nullable=False),
    sa.Column("cost_total_dollars", sa.BigInteger, nullable=False),
    sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
)
type_outcome_cost_buckets = sa.Table(
    "type_outcome_cost_buckets",
    metadata,
    sa.Column("type_id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("verdict", sa.SmallInteger, primary_key=True),
    sa.Column("bucket", sa.SmallInteger, primary_key=True),
    sa.Column("run_count", sa.BigInteger, nullable=False),
)
type_step_rollups = sa.Table(
    "type_step_rollups",
    metadata,
    sa.Column("type_id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("step", sa.String(64), primary_key=True),
    sa.Column("run_count", sa.BigInteger, nullable=False),
    sa.Column("event_count", sa.BigInteger, nullable=False),
    sa.Column("cost_total_dollars", sa.BigInteger, nullable=False),
    sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
)

# Events summed per hour of event time, type version (experience_name "" and version 0
# for unattributed events), category, resource and the model that priced it: the cost
# breakdown reads these.
cost_rollups = sa.Table(
    "cost_rollups",
    metadata,
    sa.Column("hour_us", sa.BigInteger, primary_key=True),
    sa.Column("experience_name", sa.String(64), primary_key=True),
    sa.Column("experience_version", sa.Integer, primary_key=True),
    sa.Column("category", sa.String(128), primary_key=True),
    sa.Column("resource", sa.String(256), primary_key=True),
    # The model of the price entry that priced the events; the resource for unpriced ones.
    sa.Column("model", sa.String(256), primary_key=True),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_COUNT_COLUMNS),
    *(sa.Column(name, sa.BigInteger, nullable=False) for money in ROLLUP_MONEY for name in ROLLUP_SPLIT[money]),
    # migration 0013
    *(
        sa.Column(name, sa.BigInteger, nullable=False, server_default="0")
        for t in ROLLUP_TOKENS
        for name in ROLLUP_SPLIT[t]
    ),
    sqlite_with_rowid=False,  # migration 0015
)

# Events summed per hour, user (dimension 1) or request tag (dimension 2), and type version,
# and the same per UTC day (dimensions 3 and 4, hour_us the day's start; migration 0014): an
# event counts once under its user and once under each of its tags (once under a tag it
# repeats, since 0023), under "" for none. The cost breakdown by user or tag reads these, as
# it reads cost_rollups.
attribute_rollups = sa.Table(
    "attribute_rollups",
    metadata,
    sa.Column("dimension", sa.SmallInteger, primary_key=True),
    sa.Column("hour_us", sa.BigInteger, primary_key=True),
    sa.Column("value", sa.String(256), primary_key=True),
    sa.Column("experience_name", sa.String(64), primary_key=True),
    sa.Column("experience_version", sa.Integer, primary_key=True),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_COUNT_COLUMNS),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_SPLIT_COLUMNS),
    # SQLite: the rows kept once, in key order, instead of a table and an index of its key.
    # No other index: an erasure, which finds a user's rows, is rare enough to scan.
    sqlite_with_rowid=False,
)

# Events summed per UTC day, user (dimension 1), request tag (2) or API key name (5), type
# version, category and the model that priced them (migration 0021): the cost breakdown of
# one of user, tag and key beside a provider or model (grouped by or kept to) reads these
# for a window's whole days. Counted as attribute_rollups counts (an event once under each
# tag), per day only: a day holds users times models rows, not events. Keyed by model before
# user (0024): one model's rows of a day lie together (reports._days_listed).
attribute_model_days = sa.Table(
    "attribute_model_days",
    metadata,
    sa.Column("dimension", sa.SmallInteger, nullable=False),
    sa.Column("day_us", sa.BigInteger, nullable=False),
    sa.Column("value", sa.String(256), nullable=False),
    sa.Column("experience_name", sa.String(64), nullable=False),
    sa.Column("experience_version", sa.Integer, nullable=False),
    sa.Column("category", sa.String(128), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_COUNT_COLUMNS),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_SPLIT_COLUMNS),
    sa.PrimaryKeyConstraint(
        "dimension", "day_us", "model", "value", "experience_name", "experience_version", "category"
    ),
    sqlite_with_rowid=False,  # as attribute_rollups
)

# Events summed per UTC day, user (dimension 1), request tag (2) or API key name (5), type
# version and category (migration 0022): attribute_model_days without the model. The cost
# breakdown of one of user, tag and key beside a provider (and no model) reads it for a
# window's whole days: a provider of five models has a fifth of their rows.
attribute_provider_days = sa.Table(
    "attribute_provider_days",
    metadata,
    sa.Column("dimension", sa.SmallInteger, primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("value", sa.String(256), primary_key=True),
    sa.Column("experience_name", sa.String(64), primary_key=True),
    sa.Column("experience_version", sa.Integer, primary_key=True),
    sa.Column("category", sa.String(128), primary_key=True),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_COUNT_COLUMNS),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_SPLIT_COLUMNS),
    sqlite_with_rowid=False,  # as attribute_rollups
)

# Each request tag's events summed per UTC day by user (dimension 1) or API key name (5) and
# type version (migration 0022): an event counts once under each of its tags (once under a
# tag it repeats; under "" without tags, since 0023). The cost breakdown of a tag's events by
# user or key, of one user's events of a tag, or of one user's (or by key) by tag, reads it
# for a window's whole days; without it, those reads took every event of the tag, or user.
tag_attribute_days = sa.Table(
    "tag_attribute_days",
    metadata,
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.Column("dimension", sa.SmallInteger, primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("value", sa.String(256), primary_key=True),
    sa.Column("experience_name", sa.String(64), primary_key=True),
    sa.Column("experience_version", sa.Integer, primary_key=True),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_COUNT_COLUMNS),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ROLLUP_SPLIT_COLUMNS),
    # One user's (or key's) rows (0023): by its key, a user's tags read every user's rows of
    # the window's days (122,579 rows for 610 at 1,000,000 events).
    sa.Index("ix_tag_attribute_days_value", "dimension", "value", "tag", "day_us"),
    sqlite_with_rowid=False,  # as attribute_rollups
)

# Why events were not (fully) priced, counted per user (dimension 1), request tag (2) or API
# key name (5), UTC day, category, model (the price's, else the resource sent), cost state and
# reason (migration 0026): an event counts once per distinct reason under each, as
# attribute_rollups counts it. The dashboard's reasons of a user or a tag read its rows (the
# key its value, then the day), and every key's rows are every event's reasons: before, a
# user's newest 1,000 such events were read, ten times as many at ten times the history.
unpriced_reason_days = sa.Table(
    "unpriced_reason_days",
    metadata,
    sa.Column("dimension", sa.SmallInteger, primary_key=True),
    sa.Column("value", sa.String(256), primary_key=True),
    sa.Column("day_us", sa.BigInteger, primary_key=True),
    sa.Column("category", sa.String(128), primary_key=True),
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("cost_state", sa.SmallInteger, primary_key=True),
    sa.Column("reason", sa.String(300), primary_key=True),
    sa.Column("event_count", sa.BigInteger, nullable=False),
    sqlite_with_rowid=False,  # as attribute_rollups
)

# The prices events were priced with, one row each, named by the events' price_id (migration
# 0018): a price's source, category, resource, version (a custom price's id), effective time
# and variant (the pairs of the price context that selected it) were text in every event.
applied_prices = sa.Table(
    "applied_prices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # What a price is unique by: storage.applied_prices.key_of.
    sa.Column("price_key", sa.Text, nullable=False, unique=True),
    sa.Column("source", sa.SmallInteger, nullable=False),
    sa.Column("category", sa.String(128), nullable=False),
    sa.Column("resource", sa.String(256), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("effective_time_us", sa.BigInteger, nullable=True),
    sa.Column("variant", sa.JSON(none_as_null=True), nullable=True),
)

# One row per stored event. experience_id has no foreign key on purpose: deleting
# an experience leaves its events stored, unattributed (experience_id set to NULL).
# On PostgreSQL (migration 0028) the table is partitioned by week of event_time_us, and its
# primary key is (id, event_time_us): storage.partitions makes and drops the weeks.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", Uuid, primary_key=True),
    sa.Column("idempotency_key", sa.String(300), nullable=True),
    sa.Column("content_hash", sa.String(64), nullable=False),  # "" for an event without a key
    sa.Column("experience_id", Uuid, nullable=True),
    sa.Column("experience_created", sa.Boolean, nullable=False),
    sa.Column("category", sa.String(128), nullable=False),
    sa.Column("resource", sa.String(256), nullable=False),
    sa.Column("units", sa.JSON, nullable=False),
    # The units' input and output counts summed (domain.rollups.tokens_of; migration 0013):
    # reads that sum events' tokens add two columns instead of parsing every event's units.
    sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("event_time_us", sa.BigInteger, nullable=False, index=True),
    sa.Column("ingest_time_us", sa.BigInteger, nullable=False),
    sa.Column("end_to_end_latency_ms", sa.BigInteger, nullable=False),
    sa.Column("time_to_first_token_ms", sa.BigInteger, nullable=False),
    sa.Column("http_status_code", sa.Integer, nullable=False),
    sa.Column("provider_response_id", sa.String(256), nullable=True),
    sa.Column("user_id", sa.String(256), nullable=True),
    sa.Column("request_tags", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("properties", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("cost_input_nanos", sa.BigInteger, nullable=False),
    sa.Column("cost_output_nanos", sa.BigInteger, nullable=False),
    sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
    sa.Column("cost_state", sa.SmallInteger, nullable=False),
    sa.Column("unknown_units", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("warnings", sa.JSON(none_as_null=True), nullable=True),
    # The event's price context as sent and merged ({key: value}).
    sa.Column("price_context", sa.JSON(none_as_null=True), nullable=True),
    # The step of its run the event named (migration 0009); NULL for none.
    sa.Column("step", sa.String(64), nullable=True),
    # The name of the API key that sent it (migration 0013); NULL with keys off, and for
    # the events stored before.
    sa.Column("key_name", sa.String(64), nullable=True),
    # The price that priced it, a row of applied_prices (migration 0018); NULL for none.
    sa.Column("price_id", sa.Integer, nullable=True),
    # Annotations find an event by the provider's response id (migration 0010), of the
    # events that have one (migration 0018).
    sa.Index(
        "ix_events_provider_response_id",
        "provider_response_id",
        sqlite_where=sa.text("provider_response_id IS NOT NULL"),
        postgresql_where=sa.text("provider_response_id IS NOT NULL"),
    ),
    # A user's events in event-time order, of the events that name one (migration 0020): the
    # reads of one user (request log, runs, unpriced reasons, runs counted) and erasures. With
    # each event's run and cost state (0023), the user's runs are counted, and its events of
    # a state found, from the index alone: 16 bytes more an event, and at 1,000,000 events
    # 11.8 -> 2.5 ms to count a user's runs, 9 -> 0.5 ms to find its partially priced events.
    sa.Index(
        "ix_events_user_time",
        "user_id",
        "event_time_us",
        "experience_id",
        "cost_state",
        sqlite_where=sa.text("user_id IS NOT NULL"),
        postgresql_where=sa.text("user_id IS NOT NULL"),
    ),
    # An experience's events in event-time order (ListEvents, deletions); ties of time are
    # put in id order by a sort after the index (migration 0016: the id was a second copy).
    sa.Index("ix_events_experience_time", "experience_id", "event_time_us"),
    # The events not fully priced, of one state, newest first as ListEvents orders them (the
    # dashboard's reasons): without it, their newest thousand were sorted out of the whole
    # window; without the state first, a state with none scanned all the others.
    # The events no price priced, by the resource sent and time (migration 0022): the events
    # of a model no price has (a misspelt one), which is their resource, newest first.
    sa.Index(
        "ix_events_unpriced_resource",
        "resource",
        "event_time_us",
        sqlite_where=sa.text("price_id IS NULL"),
        postgresql_where=sa.text("price_id IS NULL"),
    ),
    sa.Index(
        "ix_events_not_priced",
        "cost_state",
        "event_time_us",
        "id",
        sqlite_where=sa.text("cost_state != 1"),
        postgresql_where=sa.text("cost_state != 1"),
    ),
)

# One event per idempotency key (migration 0028; before it, a unique index of events): the
# writer claims an event's key here before it inserts the event, and inserts it only if it
# won the key. On PostgreSQL `events` is partitioned by week of event time (storage.partitions),
# and a partitioned table's unique indexes must hold its time. The event time says which
# partition holds the event.
event_keys = sa.Table(
    "event_keys",
    metadata,
    sa.Column("idempotency_key", sa.String(300), primary_key=True),
    sa.Column("event_id", Uuid, nullable=False),
    sa.Column("event_time_us", sa.BigInteger, nullable=False),
    sqlite_with_rowid=False,
)

# request_id idempotency of the explicit create calls (AIP-155).
idempotent_requests = sa.Table(
    "idempotent_requests",
    metadata,
    sa.Column("operation", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("resource_key", sa.String(128), nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
)

custom_prices = sa.Table(
    "custom_prices",
    metadata,
    sa.Column("id", Uuid, primary_key=True),
    sa.Column("category", sa.String(128), nullable=False),
    sa.Column("resource", sa.String(256), nullable=False),
    sa.Column("effective_time_us", sa.BigInteger, nullable=False),
    sa.Column("unit_prices", sa.JSON, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    # Changes when the price is added or ended: replicas reload prices when the latest one moves.
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    sa.Column("create_key", sa.String(64), nullable=True),
    sa.Column("end_time_us", sa.BigInteger, nullable=True),
    sa.Column("end_key", sa.String(64), nullable=True),
    # A variant's price context ({key: value}), and the same as sorted "k=v,k=v" text ("" for
    # none): one price per resource, variant and effective time.
    sa.Column("price_context", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("price_context_key", sa.String(600), nullable=False),
    sa.UniqueConstraint(
        "category", "resource", "effective_time_us", "price_context_key", name="uq_custom_prices_resource_time_context"
    ),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", sa.JSON, nullable=False),
    # SHA-256 of the secret, hex: the secret itself is never stored.
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("last_use_time_us", sa.BigInteger, nullable=True),
    sa.Column("revoke_time_us", sa.BigInteger, nullable=True),
)

# Keys the replicas of one database share, made by a migration: "page_tokens" signs page tokens.
server_keys = sa.Table(
    "server_keys",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(128), nullable=False),  # hex
)

# --- limits ------------------------------------------------------------------------------

limits = sa.Table(
    "limits",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("kind", sa.SmallInteger, nullable=False),
    sa.Column("max_nanos", sa.BigInteger, nullable=False),
    sa.Column("threshold_percent", sa.SmallInteger, nullable=False),
    sa.Column("scope_kind", sa.SmallInteger, nullable=False),
    sa.Column("scope_type", sa.String(64), nullable=False),
    sa.Column("scope_version", sa.Integer, nullable=False),
    sa.Column("per_experience", sa.Boolean, nullable=False),
    sa.Column("scope_value", sa.String(256), nullable=False),
    sa.Column("period", sa.SmallInteger, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
)

limit_resets = sa.Table(
    "limit_resets",
    metadata,
    sa.Column("limit_id", sa.Integer, primary_key=True),
    sa.Column("reset_time_us", sa.BigInteger, primary_key=True),
)

# One row: bumped by every change of a limit, so that each replica's writer sees the
# change in the transaction that follows it.
limit_revision = sa.Table(
    "limit_revision",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

# A limit's spend in one period (of one experience, for a per-experience limit). Money as
# a sum of whole dollars and a sum of leftover nanos, as in the rollups: exact, no overflow.
limit_spend = sa.Table(
    "limit_spend",
    metadata,
    sa.Column("limit_id", sa.Integer, primary_key=True),
    sa.Column("subject", sa.String(36), primary_key=True),
    sa.Column("start_us", sa.BigInteger, primary_key=True),
    sa.Column("spend_dollars", sa.BigInteger, nullable=False),
    sa.Column("spend_nanos", sa.BigInteger, nullable=False),
    sa.Column("event_count", sa.BigInteger, nullable=False),
    # A limit's current periods, the most spent first: a per-experience limit's busiest runs
    # (ListLimitPeriods, order_by "spend desc"; migration 0013).
    sa.Index("ix_limit_spend_busiest", "limit_id", "start_us", "spend_dollars", "spend_nanos", "subject"),
)

limit_reservations = sa.Table(
    "limit_reservations",
    metadata,
    sa.Column("id", Uuid, primary_key=True),
    sa.Column("amount_nanos", sa.BigInteger, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("expire_time_us", sa.BigInteger, nullable=False),
    sa.Column("settle_time_us", sa.BigInteger, nullable=True),
    sa.Column("key_name", sa.String(64), nullable=False),
)

# What a reservation holds against each BLOCK limit that applied.
limit_holds = sa.Table(
    "limit_holds",
    metadata,
    sa.Column("reservation_id", Uuid, primary_key=True),
    sa.Column("limit_id", sa.Integer, primary_key=True),
    sa.Column("subject", sa.String(36), primary_key=True),
    sa.Column("amount_nanos", sa.BigInteger, nullable=False),
    sa.Column("expire_time_us", sa.BigInteger, nullable=False),
    sa.Index(None, "limit_id", "subject", "expire_time_us"),
)

# The latest value of each outcome of a run, and every change of them (migration 0008).
experience_outcomes = sa.Table(
    "experience_outcomes",
    metadata,
    sa.Column("experience_id", Uuid, sa.ForeignKey("experiences.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("record_time_us", sa.BigInteger, nullable=False),
    sa.Column("key_name", sa.String(64), nullable=False),
)

experience_outcome_changes = sa.Table(
    "experience_outcome_changes",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("experience_id", Uuid, sa.ForeignKey("experiences.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("record_time_us", sa.BigInteger, nullable=False),
    sa.Column("key_name", sa.String(64), nullable=False),
    sa.Index("ix_experience_outcome_changes_experience", "experience_id", "id"),
)

# What each step of a run cost, kept by the ingest writer (migration 0009).
experience_step_costs = sa.Table(
    "experience_step_costs",
    metadata,
    sa.Column("experience_id", Uuid, sa.ForeignKey("experiences.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("step", sa.String(64), primary_key=True),
    sa.Column("event_count", sa.BigInteger, nullable=False),
    sa.Column("cost_total_dollars", sa.BigInteger, nullable=False),
    sa.Column("cost_total_nanos", sa.BigInteger, nullable=False),
    sqlite_with_rowid=False,  # migration 0015
)

# Who last set each property of an experience and when (migration 0012).
experience_property_updates = sa.Table(
    "experience_property_updates",
    metadata,
    sa.Column("experience_id", Uuid, sa.ForeignKey("experiences.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    sa.Column("key_name", sa.String(64), nullable=False),
)

# Annotations of stored events, set after the fact (migration 0010); an event's own row never changes.
event_annotations = sa.Table(
    "event_annotations",
    metadata,
    sa.Column("event_id", Uuid, primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    sa.Column("key_name", sa.String(64), nullable=False),
)
