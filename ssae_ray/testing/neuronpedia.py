"""A database that behaves like Neuronpedia's for its importer, and the importer's steps, for tests.

`SCHEMA` is the part of Neuronpedia's Prisma schema (github.com/hijohnnylin/neuronpedia,
`apps/webapp/prisma/schema.prisma`) an SAE import touches: the models `User`, `Model`,
`SourceRelease`, `SourceSet`, `Source`, `Neuron` and `Activation` with their scalar columns,
defaults, unique keys and foreign keys, laid out in PostgreSQL as Prisma's migrations lay out a
schema (`String` TEXT, `Int` INTEGER, `Float` DOUBLE PRECISION, `DateTime` TIMESTAMP(3), `Json`
JSONB, enums as types, scalar lists as nullable arrays, `@@unique` as `<Model>_<cols>_key`
indexes, relations as `<Model>_<cols>_fkey` constraints `ON UPDATE CASCADE` with the schema's
`onDelete`). `DEFAULT_USER` is the seeded creator (`apps/webapp/prisma/seed.ts`).

`import_source` follows the admin import route (`apps/webapp/app/api/admin/import/route.ts`) for
one `<model>/<source>` folder: release, model, source set and source are each created with Prisma's
`create` unless one with the same key exists (`prisma_create` checks what Prisma's client checks:
only fields of the model, the JSON type of each, no null for a list or `Json` field, DateTimes in
ISO 8601 with a zone); then every `features/*.jsonl.gz` goes to `Neuron` and every
`activations/*.jsonl.gz` to `Activation` through `import_jsonl`, the importer's
`importJsonlString` (`apps/webapp/lib/db/import.ts`): columns from the first line's keys,
`INSERT ... SELECT FROM jsonb_to_recordset(...) ON CONFLICT DO NOTHING` in chunks of 65,000 lines.
"""

from __future__ import annotations

import gzip
import json
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_USER = "clkht01d40000jv08hvalcvly"
"""`DEFAULT_CREATOR_USER_ID` (`apps/webapp/lib/env.ts`): the seeded bot that creates uploads."""

_UPD = "ON UPDATE CASCADE"

SCHEMA = f"""
CREATE TYPE "Visibility" AS ENUM ('PUBLIC', 'UNLISTED', 'PRIVATE');

CREATE TABLE "User" (
    "id" TEXT NOT NULL, "name" TEXT NOT NULL, "bio" TEXT DEFAULT '', "email" TEXT,
    "emailVerified" TIMESTAMP(3), "githubUsername" TEXT, "bot" BOOLEAN NOT NULL DEFAULT false, "image" TEXT,
    "admin" BOOLEAN NOT NULL DEFAULT false, "canTriggerExplanations" BOOLEAN NOT NULL DEFAULT false,
    "isProblemEditor" BOOLEAN NOT NULL DEFAULT false,
    "emailNewsletterNotification" BOOLEAN NOT NULL DEFAULT true,
    "emailUnsubscribeAll" BOOLEAN NOT NULL DEFAULT false, "emailUnsubscribeCode" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "User_pkey" PRIMARY KEY ("id"));
CREATE UNIQUE INDEX "User_name_key" ON "User"("name");
CREATE UNIQUE INDEX "User_email_key" ON "User"("email");
CREATE UNIQUE INDEX "User_emailUnsubscribeCode_key" ON "User"("emailUnsubscribeCode");

CREATE TABLE "Model" (
    "id" TEXT NOT NULL, "displayNameShort" TEXT NOT NULL DEFAULT '', "displayName" TEXT NOT NULL DEFAULT '',
    "creatorId" TEXT NOT NULL, "tlensId" TEXT, "openRouterId" TEXT, "dimension" INTEGER,
    "thinking" BOOLEAN NOT NULL DEFAULT false, "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "defaultSourceSetName" TEXT, "defaultSourceId" TEXT, "defaultGraphSourceSetName" TEXT,
    "inferenceEnabled" BOOLEAN NOT NULL DEFAULT false, "instruct" BOOLEAN NOT NULL DEFAULT false,
    "layers" INTEGER NOT NULL, "neuronsPerLayer" INTEGER NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, "owner" TEXT NOT NULL,
    "updatedAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP, "website" TEXT,
    CONSTRAINT "Model_pkey" PRIMARY KEY ("id"));
CREATE UNIQUE INDEX "Model_defaultSourceSetName_id_key" ON "Model"("defaultSourceSetName", "id");
CREATE UNIQUE INDEX "Model_defaultSourceId_id_key" ON "Model"("defaultSourceId", "id");
CREATE UNIQUE INDEX "Model_defaultGraphSourceSetName_id_key" ON "Model"("defaultGraphSourceSetName", "id");

CREATE TABLE "SourceRelease" (
    "name" TEXT NOT NULL, "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "isNewUi" BOOLEAN NOT NULL DEFAULT false, "featured" BOOLEAN NOT NULL DEFAULT false,
    "description" TEXT NOT NULL, "descriptionShort" TEXT, "urls" TEXT[], "creatorEmail" TEXT,
    "creatorName" TEXT NOT NULL, "creatorNameShort" TEXT, "creatorId" TEXT NOT NULL,
    "defaultSourceSetName" TEXT, "defaultSourceId" TEXT, "defaultUmapSourceIds" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE UNIQUE INDEX "SourceRelease_name_key" ON "SourceRelease"("name");

CREATE TABLE "SourceSet" (
    "modelId" TEXT NOT NULL, "name" TEXT NOT NULL, "hasDashboards" BOOLEAN NOT NULL DEFAULT true,
    "allowInferenceSearch" BOOLEAN NOT NULL DEFAULT true, "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "description" TEXT NOT NULL, "type" TEXT NOT NULL DEFAULT '', "creatorName" TEXT NOT NULL, "urls" TEXT[],
    "creatorEmail" TEXT, "creatorId" TEXT NOT NULL, "releaseName" TEXT,
    "hasGraphs" BOOLEAN NOT NULL DEFAULT false, "graphEnabled" BOOLEAN NOT NULL DEFAULT false,
    "similarityMatrixEnabled" BOOLEAN NOT NULL DEFAULT false, "defaultOfModelId" TEXT,
    "defaultGraphModelId" TEXT, "defaultRange" INTEGER NOT NULL DEFAULT 1,
    "defaultShowBreaks" BOOLEAN NOT NULL DEFAULT true, "showDfa" BOOLEAN NOT NULL DEFAULT false,
    "showCorrelated" BOOLEAN NOT NULL DEFAULT false, "showHeadAttribution" BOOLEAN NOT NULL DEFAULT false,
    "showUmap" BOOLEAN NOT NULL DEFAULT false, "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE UNIQUE INDEX "SourceSet_modelId_name_key" ON "SourceSet"("modelId", "name");

CREATE TABLE "Source" (
    "id" TEXT NOT NULL, "modelId" TEXT NOT NULL, "hasDashboards" BOOLEAN NOT NULL DEFAULT true,
    "inferenceEnabled" BOOLEAN NOT NULL DEFAULT false, "saelensConfig" JSONB, "saelensRelease" TEXT,
    "saelensSaeId" TEXT, "hfRepoId" TEXT, "hfFolderId" TEXT, "visibility" "Visibility" NOT NULL DEFAULT 'PRIVATE',
    "defaultOfModelId" TEXT, "setName" TEXT NOT NULL, "creatorId" TEXT NOT NULL,
    "hasUmap" BOOLEAN NOT NULL DEFAULT false, "hasUmapLogSparsity" BOOLEAN NOT NULL DEFAULT false,
    "hasUmapClusters" BOOLEAN NOT NULL DEFAULT false, "num_prompts" INTEGER, "num_tokens_in_prompt" INTEGER,
    "dataset" TEXT, "notes" TEXT, "cosSimMatchModelId" TEXT, "cosSimMatchSourceId" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE UNIQUE INDEX "Source_modelId_id_key" ON "Source"("modelId", "id");

CREATE TABLE "Neuron" (
    "modelId" TEXT NOT NULL, "layer" TEXT NOT NULL, "index" TEXT NOT NULL, "sourceSetName" TEXT,
    "creatorId" TEXT, "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "maxActApprox" DOUBLE PRECISION DEFAULT 0, "hasVector" BOOLEAN NOT NULL DEFAULT false,
    "vector" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[], "vectorLabel" TEXT,
    "vectorDefaultSteerStrength" DOUBLE PRECISION DEFAULT 10, "hookName" TEXT,
    "topkCosSimIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "topkCosSimValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    {
    ", ".join(
        f'"{c}" {t}[] DEFAULT ARRAY[]::{t}[]'
        for c, t in (
            ("neuron_alignment_indices", "INTEGER"),
            ("neuron_alignment_values", "DOUBLE PRECISION"),
            ("neuron_alignment_l1", "DOUBLE PRECISION"),
            ("correlated_neurons_indices", "INTEGER"),
            ("correlated_neurons_pearson", "DOUBLE PRECISION"),
            ("correlated_neurons_l1", "DOUBLE PRECISION"),
            ("correlated_features_indices", "INTEGER"),
            ("correlated_features_pearson", "DOUBLE PRECISION"),
            ("correlated_features_l1", "DOUBLE PRECISION"),
            ("neg_str", "TEXT"),
            ("neg_values", "DOUBLE PRECISION"),
            ("pos_str", "TEXT"),
            ("pos_values", "DOUBLE PRECISION"),
        )
    )
},
    "frac_nonzero" DOUBLE PRECISION NOT NULL DEFAULT 0,
    {
    ", ".join(
        f'"{c}" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[]'
        for c in (
            "freq_hist_data_bar_heights",
            "freq_hist_data_bar_values",
            "logits_hist_data_bar_heights",
            "logits_hist_data_bar_values",
            "decoder_weights_dist",
        )
    )
},
    "umap_cluster" INTEGER, "umap_log_feature_sparsity" DOUBLE PRECISION, "umap_x" DOUBLE PRECISION,
    "umap_y" DOUBLE PRECISION);
CREATE UNIQUE INDEX "Neuron_modelId_layer_index_key" ON "Neuron"("modelId", "layer", "index");

CREATE TABLE "Activation" (
    "id" TEXT NOT NULL, "tokens" TEXT[], "dataIndex" TEXT, "index" TEXT NOT NULL, "layer" TEXT NOT NULL,
    "modelId" TEXT NOT NULL, "dataSource" TEXT, "maxValue" DOUBLE PRECISION NOT NULL,
    "maxValueTokenIndex" INTEGER NOT NULL, "minValue" DOUBLE PRECISION NOT NULL, "values" DOUBLE PRECISION[],
    "dfaValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[], "dfaTargetIndex" INTEGER,
    "dfaMaxValue" DOUBLE PRECISION, "zQIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[],
    "zKIndices" INTEGER[] DEFAULT ARRAY[]::INTEGER[], "zValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[],
    "creatorId" TEXT NOT NULL, "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "lossValues" DOUBLE PRECISION[] DEFAULT ARRAY[]::DOUBLE PRECISION[], "logitContributions" TEXT,
    "binMin" DOUBLE PRECISION, "binMax" DOUBLE PRECISION, "binContains" DOUBLE PRECISION,
    "qualifyingTokenIndex" INTEGER,
    CONSTRAINT "Activation_pkey" PRIMARY KEY ("id"));
CREATE INDEX "activation_model_layer_index" ON "Activation"("modelId", "layer", "index");

ALTER TABLE "Model" ADD CONSTRAINT "Model_creatorId_fkey" FOREIGN KEY ("creatorId")
    REFERENCES "User"("id") ON DELETE CASCADE {_UPD};
ALTER TABLE "Model" ADD CONSTRAINT "Model_defaultSourceSetName_id_fkey" FOREIGN KEY ("defaultSourceSetName", "id")
    REFERENCES "SourceSet"("name", "modelId") ON DELETE CASCADE {_UPD};
ALTER TABLE "Model" ADD CONSTRAINT "Model_defaultSourceId_id_fkey" FOREIGN KEY ("defaultSourceId", "id")
    REFERENCES "Source"("id", "modelId") ON DELETE CASCADE {_UPD};
ALTER TABLE "Model" ADD CONSTRAINT "Model_defaultGraphSourceSetName_id_fkey"
    FOREIGN KEY ("defaultGraphSourceSetName", "id") REFERENCES "SourceSet"("name", "modelId") ON DELETE CASCADE {
    _UPD
};
ALTER TABLE "SourceRelease" ADD CONSTRAINT "SourceRelease_creatorId_fkey" FOREIGN KEY ("creatorId")
    REFERENCES "User"("id") ON DELETE CASCADE {_UPD};
ALTER TABLE "SourceSet" ADD CONSTRAINT "SourceSet_modelId_fkey" FOREIGN KEY ("modelId")
    REFERENCES "Model"("id") ON DELETE CASCADE {_UPD};
ALTER TABLE "SourceSet" ADD CONSTRAINT "SourceSet_creatorId_fkey" FOREIGN KEY ("creatorId")
    REFERENCES "User"("id") ON DELETE CASCADE {_UPD};
ALTER TABLE "SourceSet" ADD CONSTRAINT "SourceSet_releaseName_fkey" FOREIGN KEY ("releaseName")
    REFERENCES "SourceRelease"("name") ON DELETE CASCADE {_UPD};
ALTER TABLE "Source" ADD CONSTRAINT "Source_modelId_setName_fkey" FOREIGN KEY ("modelId", "setName")
    REFERENCES "SourceSet"("modelId", "name") ON DELETE RESTRICT {_UPD};
ALTER TABLE "Source" ADD CONSTRAINT "Source_creatorId_fkey" FOREIGN KEY ("creatorId")
    REFERENCES "User"("id") ON DELETE CASCADE {_UPD};
ALTER TABLE "Source" ADD CONSTRAINT "Source_cosSimMatchSourceId_cosSimMatchModelId_fkey"
    FOREIGN KEY ("cosSimMatchSourceId", "cosSimMatchModelId") REFERENCES "Source"("id", "modelId")
    ON DELETE SET NULL {_UPD};
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_modelId_layer_fkey" FOREIGN KEY ("modelId", "layer")
    REFERENCES "Source"("modelId", "id") ON DELETE CASCADE {_UPD};
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_modelId_sourceSetName_fkey" FOREIGN KEY ("modelId", "sourceSetName")
    REFERENCES "SourceSet"("modelId", "name") ON DELETE CASCADE {_UPD};
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_creatorId_fkey" FOREIGN KEY ("creatorId")
    REFERENCES "User"("id") ON DELETE CASCADE {_UPD};
ALTER TABLE "Neuron" ADD CONSTRAINT "Neuron_modelId_fkey" FOREIGN KEY ("modelId")
    REFERENCES "Model"("id") ON DELETE CASCADE {_UPD};
ALTER TABLE "Activation" ADD CONSTRAINT "Activation_modelId_layer_index_fkey" FOREIGN KEY ("modelId", "layer", "index")
    REFERENCES "Neuron"("modelId", "layer", "index") ON DELETE CASCADE {_UPD};
ALTER TABLE "Activation" ADD CONSTRAINT "Activation_creatorId_fkey" FOREIGN KEY ("creatorId")
    REFERENCES "User"("id") ON DELETE CASCADE {_UPD};
"""

TABLES = ("User", "Model", "SourceRelease", "SourceSet", "Source", "Neuron", "Activation")


def create_schema(conn: Any) -> None:
    """The tables, keys and constraints, and the seeded default user (`prisma/seed.ts`)."""
    with conn.cursor() as cur:
        cur.execute(SCHEMA)
        cur.execute(
            'INSERT INTO "User" ("id", "name", "bot", "admin", "emailUnsubscribeCode", '
            '"emailNewsletterNotification", "emailUnsubscribeAll") VALUES (%s, %s, true, true, %s, false, true)',
            (DEFAULT_USER, "bot", secrets.token_hex(16)),
        )


def fresh_database(server: Any, name: str) -> Any:
    """A new database `name` on a `postgres.PostgresServer`, with `create_schema` run: an open
    autocommit `psycopg` connection."""
    import psycopg

    with psycopg.connect(server.conninfo, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    conn = psycopg.connect(server.conninfo.replace("dbname=postgres", f"dbname={name}"), autocommit=True)
    create_schema(conn)
    return conn


def counts(conn: Any) -> dict[str, int]:
    with conn.cursor() as cur:
        return {t: cur.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in TABLES}


# -- Prisma's create ------------------------------------------------------------------------------

_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
_SCALAR = {"text": str, "integer": int, "double precision": (int, float), "boolean": bool, "jsonb": object}


def _columns(conn: Any, table: str) -> dict[str, tuple[str, bool, bool]]:
    """column -> (element type, is a list, nullable) from the catalog."""
    q = """SELECT column_name, CASE WHEN data_type = 'ARRAY' THEN format_type(e.oid, NULL) ELSE data_type END,
                  data_type = 'ARRAY', is_nullable = 'YES'
           FROM information_schema.columns c LEFT JOIN pg_type t ON t.typname = c.udt_name
           LEFT JOIN pg_type e ON e.oid = t.typelem WHERE table_name = %s"""
    with conn.cursor() as cur:
        return {r[0]: (r[1], r[2], r[3]) for r in cur.execute(q, (table,)).fetchall()}


def _check(table: str, key: str, value: Any, col: tuple[str, bool, bool] | None) -> None:
    """What Prisma's client rejects before any SQL runs."""
    if col is None:
        raise ValueError(f"Prisma: Unknown argument `{key}` for {table}.create")
    kind, is_list, nullable = col
    if value is None:
        if is_list or kind == "jsonb" or not nullable:
            raise ValueError(f"Prisma: Argument `{key}` of {table} must not be null")
        return
    values = value if is_list else [value]
    if is_list and not isinstance(value, list):
        raise ValueError(f"Prisma: Argument `{key}` of {table}: expected a list, got {value!r}")
    for v in values:
        if kind.startswith("timestamp"):
            if not (isinstance(v, str) and _ISO.fullmatch(v)):
                raise ValueError(
                    f"Prisma: Argument `{key}` of {table}: expected ISO-8601 DateTime, got {v!r}"
                )
        elif kind == "USER-DEFINED":
            if not isinstance(v, str):
                raise ValueError(f"Prisma: Argument `{key}` of {table}: expected an enum value, got {v!r}")
        elif not isinstance(v, _SCALAR.get(kind, object)) or (isinstance(v, bool) and kind != "boolean"):
            raise ValueError(f"Prisma: Argument `{key}` of {table}: expected {kind}, got {v!r}")


def prisma_create(conn: Any, table: str, row: dict[str, Any]) -> None:
    """`prisma.<model>.create({ data: row })`: every field checked, then one INSERT of the given
    fields (the others take their defaults); a unique or foreign key violation raises."""
    cols = _columns(conn, table)
    row = {k: v for k, v in row.items() if v is not _UNDEFINED}
    for k, v in row.items():
        _check(table, k, v, cols.get(k))
    names = ", ".join(f'"{k}"' for k in row)
    with conn.cursor() as cur:
        cur.execute(
            f'INSERT INTO "{table}" ({names}) SELECT {names} FROM jsonb_populate_record(NULL::"{table}", %s::jsonb)',
            (json.dumps(row),),
        )


_UNDEFINED = object()
"""A JavaScript `undefined`: the field is left out of Prisma's data."""


def _exists(conn: Any, table: str, where: dict[str, Any]) -> bool:
    cond = " AND ".join(f'"{k}" = %s' for k in where)
    with conn.cursor() as cur:
        return (
            cur.execute(f'SELECT 1 FROM "{table}" WHERE {cond}', tuple(where.values())).fetchone() is not None
        )


# -- importJsonlString ----------------------------------------------------------------------------

COLUMN_QUERY = """
      SELECT column_name,
        CASE WHEN data_type = 'ARRAY' THEN udt_name::regtype::text || '[]'
             WHEN data_type = 'USER-DEFINED' THEN (SELECT t.typname::text FROM pg_type t WHERE t.typname = c.udt_name)
             ELSE data_type END as data_type
      FROM information_schema.columns c
      WHERE table_name = %s AND column_name = ANY(%s)
      ORDER BY ordinal_position"""
"""`importJsonlString`'s column query (`apps/webapp/lib/db/import.ts`)."""
CHUNK = 65000


def _normalize_activation(line: str) -> str:
    """`normalizeActivationJsonlLine`: `zIndices` [k, q] into the `zKIndices` / `zQIndices` columns."""
    parsed = json.loads(line)
    z = parsed.get("zIndices")
    if isinstance(z, list):
        for name, part in zip(("zKIndices", "zQIndices"), z):
            if isinstance(part, list) and all(isinstance(i, int | float) for i in part):
                parsed[name] = part
    return json.dumps(parsed)


def import_jsonl(conn: Any, table: str, data: str) -> None:
    """`importJsonlString(tableName, jsonlData)`, statement for statement."""
    data = data.replace("\\u0000", " ")
    if table == "Activation":
        data = "\n".join(_normalize_activation(x) for x in data.strip().split("\n") if x.strip())
    first = data.strip().split("\n")[0]
    available = list(json.loads(first))  # JSON.parse: an empty file throws here and aborts the import
    with conn.cursor() as cur:
        cur.execute("SET work_mem = '2GB'")
        columns = cur.execute(COLUMN_QUERY, (table, available)).fetchall()
        defs = ", ".join(f'"{name}" {kind}' for name, kind in columns)
        names = ", ".join(f'"{name}"' for name, _ in columns)
        query = (f'INSERT INTO "{table}" ({names}) SELECT {names} FROM jsonb_to_recordset(%s::jsonb) as t({defs}) '
                 "ON CONFLICT DO NOTHING")  # fmt: skip
        lines = data.strip().split("\n")
        for i in range(0, len(lines), CHUNK):
            cur.execute(query, ("[" + ",".join(lines[i : i + CHUNK]) + "]",))


# -- the import route -----------------------------------------------------------------------------


_JS_DATE = re.compile(r"\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)?)?")


def _js_date(value: Any) -> str:
    """`new Date(value)` (an ISO string; one without a zone read as UTC here), as Prisma sends it."""
    if not (isinstance(value, str) and _JS_DATE.fullmatch(value)):
        raise ValueError(f"Prisma: Invalid Date from {value!r}")
    d = datetime.fromisoformat(value.replace("Z", "+00:00"))
    d = d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    return d.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _lines(path: Path) -> list[dict[str, Any]]:
    """`downloadFileJsonlParsedLines` (`apps/webapp/lib/utils/s3.ts`): non-empty lines, `parseLine`
    turning `createdAt` / `updatedAt` into Dates."""
    rows = [json.loads(x) for x in path.read_text().split("\n") if x]
    for row in rows:
        for key in ("createdAt", "updatedAt"):
            if row.get(key):
                row[key] = _js_date(row[key])
    return rows


def import_source(conn: Any, folder: Path) -> None:
    """The admin import route for one exported `<model id>/<source id>` folder (explanations aside)."""
    model_id = folder.parent.name
    try:  # the route logs and skips a failing release
        for line in _lines(folder / "release.jsonl"):
            if not _exists(conn, "SourceRelease", {"name": line["name"]}):
                prisma_create(conn, "SourceRelease", line)
    except Exception as e:  # noqa: BLE001
        print(f"Error importing release: {e}")
    for line in _lines(folder / "model.jsonl"):
        if not _exists(conn, "Model", {"id": line["id"]}):
            prisma_create(conn, "Model", line)
    for line in _lines(folder / "sourceset.jsonl"):
        if not _exists(conn, "SourceSet", {"modelId": model_id, "name": line["name"]}):
            prisma_create(conn, "SourceSet", {**line, "urls": line.get("urls") or []})
    for line in _lines(folder / "source.jsonl"):
        if not _exists(conn, "Source", {"modelId": model_id, "id": line["id"]}):
            hosts = line.get("inferenceHosts")
            prisma_create(conn, "Source", {**line, "inferenceHosts": hosts if hosts else _UNDEFINED})
    for table, sub in (("Neuron", "features"), ("Activation", "activations")):
        # getFilesInPath: an S3 listing, in key order (batch-0, batch-1, batch-10, ...)
        for path in sorted((folder / sub).glob("*.jsonl.gz")):
            import_jsonl(conn, table, gzip.decompress(path.read_bytes()).decode())
