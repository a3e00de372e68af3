"""The gateway's routes: the file read and checked, the prompts it names made, a call's
route chosen, the calls of each route counted against its limit, the file reloaded.

``RouteTable.open(path)`` reads the file at start: an error stops the gateway with one
line naming the file and the line. ``reload()`` (on SIGHUP, or when ``watch`` sees the
file change) reads it again; a file that does not check keeps the routes in force and
logs the error with its line. A call keeps the :class:`Route` it was given for its whole
life, so a reload never changes a call in progress; counts and limits go by route name,
so a route's calls in progress still count against its limit after a reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from service.gateway import metrics
from service.gateway.media.prompts import Prompt, check_wav, tone, wav_prompt
from service.gateway.routes import yamlfile
from service.gateway.routes.schema import Announcement, Route, RoutesError, RouteSet, default_routes, parse

log = logging.getLogger("moshimoshi.routes")

WATCH_SECONDS = 1.0


@dataclass(frozen=True)
class Trunk:
    """Where a call came from, as routes may match it: the signalling source's address and
    the digest user its INVITE authenticated as (None without digest authentication)."""

    source: str | None = None
    digest_user: str | None = None


@dataclass(frozen=True)
class LoadedRoutes:
    """One version of the routes with the prompts they name, made."""

    routes: RouteSet
    prompts: dict[Announcement, Prompt]
    fingerprint: str


def load_file(path: str, *, digest_users: bool) -> LoadedRoutes:
    """Read, check and prepare a routes file; raises :class:`RoutesError` (``where(path)``
    gives the one-line message)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise RoutesError(0, exc.strerror or str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RoutesError(raw[: exc.start].count(b"\n") + 1, "not UTF-8 text") from None
    try:
        data = yamlfile.load(text)
    except yamlfile.YamlError as exc:
        raise RoutesError(exc.line, exc.message) from None
    routes = parse(data, base=Path(path).resolve().parent, check_file=check_wav, digest_users=digest_users)
    routes = RouteSet(
        routes=routes.routes, plan=routes.plan, unmatched=routes.unmatched, webrtc=routes.webrtc, source=path
    )
    return LoadedRoutes(routes, make_prompts(routes), hashlib.sha256(raw).hexdigest())


def make_prompts(routes: RouteSet) -> dict[Announcement, Prompt]:
    """Every tone and WAV the routes name, ready to play (read once here, never per call)."""
    prompts: dict[Announcement, Prompt] = {}
    for route in routes.routes:
        wanted = [(route.announcement, True), (route.overflow.message, False), (route.consent_announcement, False)]
        for announcement, loop in wanted:
            if announcement is None or announcement in prompts or not announcement.early_media:
                continue
            if announcement.kind == "tone":
                prompts[announcement] = tone(announcement.name)
            else:
                try:
                    prompts[announcement] = wav_prompt(announcement.name, loop=loop)
                except (OSError, ValueError) as exc:
                    raise RoutesError(route.line, f"route {route.name!r}: {announcement.name}: {exc}") from None
    return prompts


class RouteTable:
    """The routes in force, the calls on each route, and reloading (module docstring)."""

    def __init__(self, loaded: LoadedRoutes, *, path: str | None = None, digest_users: bool = False) -> None:
        self.path = path
        self.digest_users = digest_users
        self.loaded = loaded
        self.active: dict[str, int] = {}
        self.reloads = 0
        self._stat: tuple[int, int, int] | None = self._file_stat()
        self._reloading = asyncio.Lock()  # one reload at a time: the last to run read the file last

    @classmethod
    def open(cls, path: str | None, *, model: str | None = None, digest_users: bool = False) -> RouteTable:
        """The routes of ``path``, or the one default route without a file (raises RoutesError)."""
        if not path:
            routes = default_routes(model)
            return cls(LoadedRoutes(routes, make_prompts(routes), ""))
        table = cls(load_file(path, digest_users=digest_users), path=path, digest_users=digest_users)
        table._log_loaded("loaded")
        return table

    @property
    def routes(self) -> RouteSet:
        return self.loaded.routes

    # -- choosing a route --------------------------------------------------------------

    def resolve(self, dialled: str, trunk: Trunk = Trunk()) -> Route | None:
        """The first route that matches the dialled number and the trunk; else the
        unmatched route (None: no route, the call is refused with 404)."""
        routes = self.routes
        number = routes.plan.canonical(dialled)
        for route in routes.routes:
            if route.match.number_fits(number) and route.match.trunk_fits(trunk.source, trunk.digest_user):
                return route
        return routes.named(routes.unmatched) if routes.unmatched else None

    def named(self, name: str) -> Route | None:
        return self.routes.named(name)

    def for_webrtc(self) -> Route | None:
        """The route of calls from browsers (they dial no number)."""
        name = self.routes.webrtc
        return self.routes.named(name) if name else None

    def prompt(self, announcement: Announcement | None) -> Prompt | None:
        """The prompt made for ``announcement`` at load (None for ``ringing`` or none)."""
        if announcement is None:
            return None
        found = self.loaded.prompts.get(announcement)
        if found is None and announcement.kind == "tone":
            found = tone(announcement.name)  # a route kept by a call across a reload
        return found

    # -- limits ------------------------------------------------------------------------

    def admit(self, route: Route) -> bool:
        """Count a new call on ``route``; False (nothing counted) when it is at its limit."""
        active = self.active.get(route.name, 0)
        if route.max_calls is not None and active >= route.max_calls:
            metrics.ROUTE_LIMITED.labels(route.name).inc()
            return False
        self.active[route.name] = active + 1
        metrics.ROUTE_CALLS_ACTIVE.labels(route.name).set(active + 1)
        metrics.ROUTE_CALLS.labels(route.name).inc()
        return True

    def release(self, route: Route) -> None:
        """A call counted by ``admit`` is over."""
        active = max(0, self.active.get(route.name, 0) - 1)
        self.active[route.name] = active
        metrics.ROUTE_CALLS_ACTIVE.labels(route.name).set(active)

    # -- reloading ---------------------------------------------------------------------

    def _file_stat(self) -> tuple[int, int, int] | None:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    async def reload(self) -> bool:
        """Read the file again (in a thread: WAVs are decoded); True when the new routes are
        in force. A file that does not check leaves the routes as they were."""
        if not self.path:
            return False
        async with self._reloading:
            self._stat = self._file_stat()
            try:
                loaded = await asyncio.to_thread(load_file, self.path, digest_users=self.digest_users)
            except RoutesError as exc:
                metrics.ROUTE_RELOADS.labels("error").inc()
                log.error("routes not reloaded, the routes in force stay: %s", exc.where(self.path))
                return False
            if loaded.fingerprint == self.loaded.fingerprint:
                metrics.ROUTE_RELOADS.labels("unchanged").inc()
                return True
            self.loaded = loaded
            self.reloads += 1
            metrics.ROUTE_RELOADS.labels("ok").inc()
            self._log_loaded("reloaded")
            return True

    async def watch(self, interval: float = WATCH_SECONDS) -> None:
        """Reload whenever the file changes (checked every ``interval`` seconds)."""
        while True:
            await asyncio.sleep(interval)
            if self._file_stat() != self._stat:
                await self.reload()

    def _log_loaded(self, how: str) -> None:
        routes = self.routes
        log.info(
            "routes %s from %s: %s; unmatched numbers: %s",
            how,
            self.path,
            ", ".join(f"{r.name} (model {r.model or 'any'})" for r in routes.routes),
            f"route {routes.unmatched}" if routes.unmatched else "404",
        )
