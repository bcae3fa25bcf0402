"""`enrollment.EnrollmentStore` on PostgreSQL: the enrollment tables of a shared headend database.

The same three tables as `enrollment_sqlite` (serials and token hashes as TEXT, times as BIGINT
ns), created with CREATE TABLE IF NOT EXISTS outside `pg_schema`'s migrations, so enrollment can
be added to an existing database without a schema version bump. Several headend instances share
them: `mark_token_used` is one conditional UPDATE (`... AND used_at_ns IS NULL`, rowcount 1 =
won), which keeps a token one-time across instances, and revocations are rows every instance
reads at connect and renewal.

Connections are `pg_store.PooledStore`'s: psycopg 3 async, a small autocommit pool, writes that
span rows in explicit transactions. Errors are raised as `store.StoreError`.
"""

from __future__ import annotations

from headend_min.enrollment import EnrollmentToken, IssuedCertificate
from headend_min.pg_store import PooledStore, open_pool

__all__ = ["PgEnrollmentStore"]


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS enrollment_tokens (
        token_hash TEXT PRIMARY KEY,
        site_id TEXT NOT NULL,
        gateway_id TEXT NOT NULL,
        created_at_ns BIGINT NOT NULL,
        expires_at_ns BIGINT NOT NULL,
        used_at_ns BIGINT
    )""",
    """CREATE TABLE IF NOT EXISTS enrollment_certificates (
        gateway_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        site_id TEXT NOT NULL,
        public_key_sha256 TEXT NOT NULL,
        not_before_ns BIGINT NOT NULL,
        not_after_ns BIGINT NOT NULL,
        issued_at_ns BIGINT NOT NULL,
        PRIMARY KEY (gateway_id, serial)
    )""",
    # Not a column of the certificates: a serial may be revoked without being recorded here.
    """CREATE TABLE IF NOT EXISTS enrollment_revocations (
        gateway_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        revoked_at_ns BIGINT NOT NULL,
        PRIMARY KEY (gateway_id, serial)
    )""",
)
# Two instances starting together must not race on CREATE TABLE IF NOT EXISTS (it is not
# atomic in PostgreSQL): the schema is created under this transaction-level advisory lock.
_SCHEMA_LOCK = 0x64657267_656E726F  # "dergenro"

_CERT_COLUMNS = (
    "c.gateway_id, c.site_id, c.serial, c.public_key_sha256, c.not_before_ns, c.not_after_ns, "
    "c.issued_at_ns, r.revoked_at_ns"
)
_CERT_FROM = (
    "enrollment_certificates c LEFT JOIN enrollment_revocations r "
    "ON r.gateway_id = c.gateway_id AND r.serial = c.serial"
)


class PgEnrollmentStore(PooledStore):
    """Construct with `await PgEnrollmentStore.open(url)` (the headend's --db URL)."""

    @classmethod
    async def open(
        cls, url: str, *, max_size: int = 4, timeout_s: float = 5.0
    ) -> PgEnrollmentStore:
        pool = await open_pool(
            url, name="dergw-enrollment", min_size=1, max_size=max_size, timeout_s=timeout_s
        )
        store = cls(url, pool)
        try:
            async with store._transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _SCHEMA:
                    await conn.execute(statement)
        except BaseException:
            await store.close()
            raise
        return store

    # -- EnrollmentStore ---------------------------------------------------------------------------

    async def put_token(self, token: EnrollmentToken) -> None:
        await self._execute(
            "INSERT INTO enrollment_tokens (token_hash, site_id, gateway_id, created_at_ns, "
            "expires_at_ns, used_at_ns) VALUES (%s, %s, %s, %s, %s, %s)",
            (
                token.token_hash,
                token.site_id,
                token.gateway_id,
                token.created_at_ns,
                token.expires_at_ns,
                token.used_at_ns,
            ),
        )

    async def get_token(self, token_hash: str) -> EnrollmentToken | None:
        rows = await self._fetchall(
            "SELECT token_hash, site_id, gateway_id, created_at_ns, expires_at_ns, used_at_ns "
            "FROM enrollment_tokens WHERE token_hash = %s",
            (token_hash,),
        )
        return EnrollmentToken(*rows[0]) if rows else None

    async def mark_token_used(self, token_hash: str, used_at_ns: int) -> bool:
        changed = await self._execute(
            "UPDATE enrollment_tokens SET used_at_ns = %s "
            "WHERE token_hash = %s AND used_at_ns IS NULL",
            (used_at_ns, token_hash),
        )
        return changed == 1

    async def record_certificate(self, certificate: IssuedCertificate) -> None:
        await self._execute(
            "INSERT INTO enrollment_certificates (gateway_id, serial, site_id, public_key_sha256, "
            "not_before_ns, not_after_ns, issued_at_ns) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                certificate.gateway_id,
                certificate.serial,
                certificate.site_id,
                certificate.public_key_sha256,
                certificate.not_before_ns,
                certificate.not_after_ns,
                certificate.issued_at_ns,
            ),
        )

    async def get_certificate(self, gateway_id: str, serial: str) -> IssuedCertificate | None:
        rows = await self._fetchall(
            f"SELECT {_CERT_COLUMNS} FROM {_CERT_FROM} WHERE c.gateway_id = %s AND c.serial = %s",
            (gateway_id, serial),
        )
        return IssuedCertificate(*rows[0]) if rows else None

    async def list_certificates(self, gateway_id: str) -> list[IssuedCertificate]:
        rows = await self._fetchall(
            f"SELECT {_CERT_COLUMNS} FROM {_CERT_FROM} WHERE c.gateway_id = %s "
            "ORDER BY c.issued_at_ns, c.serial",
            (gateway_id,),
        )
        return [IssuedCertificate(*row) for row in rows]

    async def gateway_ids(self) -> list[str]:
        """Every gateway a certificate was issued to (for `dergw headend gateways list`)."""
        rows = await self._fetchall(
            "SELECT DISTINCT gateway_id FROM enrollment_certificates ORDER BY gateway_id", ()
        )
        return [str(row[0]) for row in rows]

    async def is_revoked(self, gateway_id: str, serial: str) -> bool:
        rows = await self._fetchall(
            "SELECT 1 FROM enrollment_revocations WHERE gateway_id = %s AND serial = %s",
            (gateway_id, serial),
        )
        return bool(rows)

    async def revoke(self, gateway_id: str, serial: str | None, at_ns: int) -> list[str]:
        async with self._transaction() as conn:
            if serial is None:
                cursor = await conn.execute(
                    "SELECT serial FROM enrollment_certificates WHERE gateway_id = %s "
                    "ORDER BY issued_at_ns",
                    (gateway_id,),
                )
                serials = [str(row[0]) for row in await cursor.fetchall()]
            else:
                serials = [serial]
            newly: list[str] = []
            for s in serials:
                cursor = await conn.execute(
                    "INSERT INTO enrollment_revocations (gateway_id, serial, revoked_at_ns) "
                    "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (gateway_id, s, at_ns),
                )
                if cursor.rowcount == 1:
                    newly.append(s)
            return newly
