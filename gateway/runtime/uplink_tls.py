"""Which identity the uplink presents, and when it renews it (reference/appliance.md §4.2-4.4).

`renewal_action` is the pure rule: a staged renewal is tried first; an expired certificate needs
a re-enrollment (the headend refuses to renew it); a certificate past 2/3 of its lifetime is
renewed when a renewal URL is configured and no recent attempt failed.

`UplinkCredentials` applies it at the edges (files in `<state_dir>/identity`, HTTPS to the
headend): `prepare()` before each connection picks the identity (staging a renewal first when
due), `connected()` after the headend's RegisterAck commits a staged renewal, `failed()` rolls it
back so the next attempt uses the old certificate, which is kept until the new one has worked.
Transports read the chosen identity with `selected()`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from datetime import UTC, datetime
from pathlib import Path

from gateway.clock import Clock
from gateway.identity import (
    Identity,
    IdentityError,
    NotEnrolledError,
    commit_renewal,
    rollback_renewal,
    stage_renewal,
)

__all__ = [
    "NOT_ENROLLED",
    "RENEWAL_RETRY_S",
    "RenewalAction",
    "UplinkCredentials",
    "renewal_action",
    "wall_datetime",
]

log = logging.getLogger(__name__)

# After a failed renewal (headend unreachable, refused, or the new certificate did not connect)
# the old certificate stays in use and renewal is tried again this much later.
RENEWAL_RETRY_S = 3600.0
# `UplinkHealth.tls_failure` while there is no identity (next to the TlsFailure values).
NOT_ENROLLED = "not_enrolled"


class RenewalAction(enum.Enum):
    CONNECT = "connect"  # connect with the current identity
    TRY_STAGED = "try_staged"  # connect with the staged renewal; commit once it worked
    STAGE = "stage"  # renewal due: get a new certificate (new key) over HTTPS first
    REENROLL = "reenroll"  # the certificate has expired: only `dergw enroll` helps


def renewal_action(
    current: Identity, staged: Identity | None, now: datetime, *, can_renew: bool
) -> RenewalAction:
    """What to do before the next connection. `can_renew`: a renewal URL is configured and no
    renewal attempt failed recently."""
    if staged is not None and staged.seconds_left(now) > 0:
        return RenewalAction.TRY_STAGED
    if current.seconds_left(now) <= 0:
        return RenewalAction.REENROLL
    if can_renew and current.renewal_due(now):
        return RenewalAction.STAGE
    return RenewalAction.CONNECT


def wall_datetime(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.wall_ns() / 1e9, tz=UTC)


class UplinkCredentials:
    """The uplink's identity: loaded from `state_dir` before each connection (so `dergw enroll`
    takes effect without a restart), renewed over HTTPS at `enroll_url`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        enroll_url: str | None,
        clock: Clock,
        renewal_retry_s: float = RENEWAL_RETRY_S,
        renewal_timeout_s: float = 30.0,
    ) -> None:
        self.state_dir = state_dir
        self.enroll_url = enroll_url
        self._clock = clock
        self._renewal_retry_s = renewal_retry_s
        self._renewal_timeout_s = renewal_timeout_s
        self.identity: Identity | None = None  # what the current / next connection presents
        self.current: Identity | None = None  # the committed identity last loaded
        self.staged_in_use = False
        self.renewals = 0  # committed renewals
        self.renewal_failures = 0
        self._renewal_blocked_until_ns = 0

    def now(self) -> datetime:
        return wall_datetime(self._clock)

    def can_renew(self) -> bool:
        return self.enroll_url is not None and self._clock.mono_ns() >= (
            self._renewal_blocked_until_ns
        )

    def _block_renewal(self) -> None:
        self.renewal_failures += 1
        self._renewal_blocked_until_ns = self._clock.mono_ns() + int(self._renewal_retry_s * 1e9)

    def selected(self) -> Identity:
        """The identity `prepare()` chose (transports call this in `connect()`)."""
        if self.identity is None:
            raise NotEnrolledError("no identity prepared for this connection")
        return self.identity

    def _load_staged(self) -> Identity | None:
        try:
            return Identity.load(self.state_dir, staged=True)
        except NotEnrolledError:
            return None
        except IdentityError as exc:
            log.warning("uplink: dropping an unusable staged renewal: %s", exc)
            rollback_renewal(self.state_dir)
            return None

    async def prepare(self) -> Identity:
        """Choose (and if due, renew) the identity for the next connection.

        Raises NotEnrolledError (run `dergw enroll`) or IdentityError (broken identity files).
        """
        self.identity = None
        self.staged_in_use = False
        current = await asyncio.to_thread(Identity.load, self.state_dir)
        self.current = current
        staged = await asyncio.to_thread(self._load_staged)
        action = renewal_action(current, staged, self.now(), can_renew=self.can_renew())
        if action is RenewalAction.STAGE:
            staged = await self.stage()
            if staged is not None:
                action = RenewalAction.TRY_STAGED
        if action is RenewalAction.TRY_STAGED and staged is not None:
            self.identity, self.staged_in_use = staged, True
        else:
            self.identity = current
        return self.identity

    async def stage(self) -> Identity | None:
        """Renew over HTTPS now; the staged identity, or None (logged; retried later)."""
        url = self.enroll_url
        if url is None:
            return None
        try:
            staged = await asyncio.to_thread(
                stage_renewal, self.state_dir, headend_url=url, timeout_s=self._renewal_timeout_s
            )
        except (IdentityError, OSError) as exc:
            self._block_renewal()
            log.warning(
                "uplink: certificate renewal at %s failed (%s); keeping the current certificate, "
                "next try in %.0f s",
                url,
                exc,
                self._renewal_retry_s,
            )
            return None
        log.info(
            "uplink: renewed certificate staged (serial %s, valid until %s); connecting with it",
            staged.serial,
            f"{staged.not_after:%Y-%m-%d %H:%M} UTC",
        )
        return staged

    def renewal_check_in_s(self) -> float | None:
        """Seconds until the current certificate's renewal is due and allowed (0 = now); None
        when it is never renewed here (no `enroll_url`, no identity, a staged one in use)."""
        current = self.current
        if self.enroll_url is None or current is None or self.staged_in_use:
            return None
        due_in = (current.renew_at - self.now()).total_seconds()
        blocked_in = (self._renewal_blocked_until_ns - self._clock.mono_ns()) / 1e9
        return max(0.0, due_in, blocked_in)

    async def connected(self) -> None:
        """The headend accepted this connection: a staged renewal becomes current."""
        if not self.staged_in_use:
            return
        committed = await asyncio.to_thread(commit_renewal, self.state_dir)
        self.identity = self.current = committed
        self.staged_in_use = False
        self.renewals += 1
        log.info("uplink: renewed certificate %s committed; old key deleted", committed.serial)

    async def failed(self) -> bool:
        """The connection failed; True when it was a staged renewal (now rolled back, the next
        attempt uses the old certificate)."""
        if not self.staged_in_use:
            return False
        self.staged_in_use = False
        await asyncio.to_thread(rollback_renewal, self.state_dir)
        self._block_renewal()
        log.warning(
            "uplink: the renewed certificate did not connect; rolled back to the current one, "
            "renewal retried in %.0f s",
            self._renewal_retry_s,
        )
        return True
