"""The routes file: what it may say, checked, with defaults; every error names its line.

A routes file (YAML) lists routes in order; a call takes the first route whose ``match``
fits it (the dialled number, exactly, by prefix or by pattern, and optionally the trunk:
its source address or the digest user it authenticated as). A route says which model
answers, where a human takes over, what the caller's keys do, what a waiting caller
hears, what happens when no slot frees, and how long and how many calls it may hold. The
README's *Routes* section has a complete example; :func:`parse` is the one reader.

Fields read by later features (recording, the caller's transcript, DTMF masking, the
consent announcement) are defined and checked here so that a file written today stays
valid.
"""

from __future__ import annotations

import math
import re
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from service.gateway.routes.numbers import NumberPlan
from service.gateway.routes.yamlfile import Mapping, Sequence
from sip.acl import AddressList

ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DTMF_KEYS = frozenset("0123456789*#ABCD")
DTMF_ACTIONS = ("transfer", "hangup")
OVERFLOW_ACTIONS = ("reject", "message", "transfer")
RECORDING_FORMATS = ("off", "wav", "ogg")
RINGING: tp.Final = "ringing"  # a 180 and no early media: the caller's phone plays its own ringback
TONES = ("ringback", "ringback-us")  # built-in tones played as early media (media/prompts.py)
SAMPLING_FLOATS = ("temp", "temp_text")
SAMPLING_INTS = ("top_k", "top_k_text")
MAX_TOP_K = 4096
MAX_TEMPERATURE = 10.0
MAX_PATTERN_CHARS = 256
MAX_ROUTES = 1000
DEFAULT_ROUTE = "default"


class RoutesError(ValueError):
    """A routes file that cannot be used: ``line`` (1-based; 0: the file as a whole) and why."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message

    def where(self, path: str) -> str:
        """One line for a log or the terminal: ``routes.yaml:12: what is wrong``."""
        return f"{path}:{self.line}: {self.message}" if self.line else f"{path}: {self.message}"


@dataclass(frozen=True)
class Announcement:
    """What a caller hears from the gateway itself: ``ringing`` (no early media), a built-in
    ``tone``, or a WAV ``file`` (any rate, 16-bit PCM)."""

    kind: tp.Literal["ringing", "tone", "file"]
    name: str  # the tone's name or the file's path

    @property
    def early_media(self) -> bool:
        return self.kind != "ringing"


@dataclass(frozen=True)
class Overflow:
    """What happens when a call waited the queue time and no slot freed, or its route is
    at its limit: ``reject`` (503 with Retry-After), ``message`` (answer, play it, BYE) or
    ``transfer`` (to ``target``, the route's fallback unless given)."""

    action: tp.Literal["reject", "message", "transfer"] = "reject"
    message: Announcement | None = None
    target: str | None = None


@dataclass(frozen=True)
class DtmfAction:
    """What a key does while the AI talks: ``transfer`` (to ``target``, default the route's
    fallback) or ``hangup``."""

    action: tp.Literal["transfer", "hangup"]
    target: str | None = None


@dataclass(frozen=True)
class Recording:
    """Whether calls are recorded (``off``, ``wav``, ``ogg``) and whether the human part of
    a bridged transfer is too (None: the gateway's ``--recording-transfer``)."""

    format: tp.Literal["off", "wav", "ogg"] = "off"
    human_part: bool | None = None


@dataclass(frozen=True)
class Match:
    """Which calls a route takes: every listed criterion must hold; within one (numbers,
    prefixes, patterns) any entry may. No number criterion: any number."""

    numbers: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()
    sources: AddressList | None = None
    digest_users: frozenset[str] = frozenset()

    @property
    def any_number(self) -> bool:
        return not (self.numbers or self.prefixes or self.patterns)

    def number_fits(self, canonical: str) -> bool:
        if self.any_number:
            return True
        return (
            canonical in self.numbers
            or any(canonical.startswith(p) for p in self.prefixes)
            or any(p.fullmatch(canonical) for p in self.patterns)
        )

    def trunk_fits(self, source: str | None, digest_user: str | None) -> bool:
        if self.sources is not None and (source is None or source not in self.sources):
            return False
        return not self.digest_users or digest_user in self.digest_users


@dataclass(frozen=True)
class Route:
    """One route (see the module docstring). ``None`` fields take the gateway's settings."""

    name: str
    match: Match = field(default_factory=Match)
    model: str | None = None
    fallback: str | None = None
    dtmf: dict[str, DtmfAction] = field(default_factory=dict)
    queue_seconds: float | None = None
    announcement: Announcement = Announcement("tone", "ringback")
    overflow: Overflow = field(default_factory=Overflow)
    max_call_seconds: float | None = None
    max_calls: int | None = None
    sampling: dict[str, float | int | bool] = field(default_factory=dict)
    recording: Recording | None = None  # None: the gateway's --recording
    transcription: bool | None = None  # None: the gateway's --transcription
    dtmf_clear: bool | None = None  # None: the gateway's --dtmf-clear
    consent_announcement: Announcement | None = None
    line: int = 0

    def transfer_target(self, given: str | None) -> str | None:
        return given or self.fallback


@dataclass(frozen=True)
class RouteSet:
    """All routes of one version of the file, in order, and how unmatched calls go."""

    routes: tuple[Route, ...]
    plan: NumberPlan = NumberPlan()
    unmatched: str | None = None  # a route's name, or None: 404
    webrtc: str | None = None  # the route of browser calls (default: the unmatched route)
    source: str = ""  # the file it was read from ("" for the built-in default)

    def named(self, name: str) -> Route | None:
        for route in self.routes:
            if route.name == name:
                return route
        return None


def default_routes(model: str | None = None) -> RouteSet:
    """No routes file: one route for every number, today's behaviour (a 180 while queued)."""
    route = Route(name=DEFAULT_ROUTE, model=model, announcement=Announcement(RINGING, RINGING))
    return RouteSet(routes=(route,), unmatched=DEFAULT_ROUTE, webrtc=DEFAULT_ROUTE)


# -- reading ---------------------------------------------------------------------------


class _Reader:
    """Checks one parsed document; ``base`` resolves relative file paths."""

    def __init__(self, base: Path, check_file: tp.Callable[[str], None] | None, digest_users: bool) -> None:
        self.base = base
        self.check_file = check_file
        self.digest_users = digest_users

    def parse(self, data: tp.Any) -> RouteSet:
        if data is None:
            raise RoutesError(0, "the file is empty: it needs a 'routes' list")
        top = self.mapping(data, 0, "the file")
        self.known(
            top,
            "the file",
            ("routes", "country_code", "national_prefix", "international_prefix", "unmatched", "webrtc"),
        )
        plan = NumberPlan(
            country_code=self.digits(top, "country_code", "81"),
            national_prefix=self.digits(top, "national_prefix", "0", empty=True),
            international_prefix=self.digits(top, "international_prefix", "010", empty=True),
        )
        if "routes" not in top:
            raise RoutesError(top.line, "the file needs a 'routes' list")
        entries = top["routes"]
        if not isinstance(entries, Sequence) or not entries:
            raise RoutesError(top.line_of("routes"), "'routes' must be a list with at least one route")
        if len(entries) > MAX_ROUTES:
            raise RoutesError(top.line_of("routes"), f"at most {MAX_ROUTES} routes")
        routes: list[Route] = []
        for index, entry in enumerate(entries):
            route = self.route(entry, entries.line_of(index), plan, index)
            if any(r.name == route.name for r in routes):
                raise RoutesError(route.line, f"route name {route.name!r} is used twice")
            routes.append(route)
        names = {r.name for r in routes}
        unmatched = self.route_name(top, "unmatched", names, allow_reject=True)
        webrtc = self.route_name(top, "webrtc", names, allow_reject=False)
        return RouteSet(routes=tuple(routes), plan=plan, unmatched=unmatched, webrtc=webrtc or unmatched)

    # -- one route ---------------------------------------------------------------------

    def route(self, entry: tp.Any, line: int, plan: NumberPlan, index: int) -> Route:
        data = self.mapping(entry, line, f"routes[{index}]")
        where = f"route {data.get('name', index)!r}"
        self.known(
            data,
            where,
            (
                "name",
                "match",
                "model",
                "fallback",
                "dtmf",
                "queue_seconds",
                "announcement",
                "overflow",
                "max_call_seconds",
                "max_calls",
                "sampling",
                "recording",
                "transcription",
                "dtmf_clear",
                "consent_announcement",
            ),
        )
        name = data.get("name")
        if not isinstance(name, str) or not ROUTE_NAME.fullmatch(name):
            raise RoutesError(
                data.line_of("name"),
                f"routes[{index}]: 'name' must be 1-64 letters, digits, "
                "'_', '.' or '-' (it is the route's label in metrics)",
            )
        fallback = self.target(data, "fallback", where)
        dtmf = self.dtmf(data, where, fallback)
        overflow = self.overflow(data, where, fallback)
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 1000):
            raise RoutesError(data.line_of("model"), f"{where}: 'model' must be a model id (as workers serve it)")
        return Route(
            name=name,
            match=self.match(data, where, plan),
            model=model,
            fallback=fallback,
            dtmf=dtmf,
            queue_seconds=self.number(data, "queue_seconds", where, 0.0, 600.0),
            announcement=self.announcement(data, "announcement", where) or Announcement("tone", "ringback"),
            overflow=overflow,
            max_call_seconds=self.number(data, "max_call_seconds", where, 1.0, 86400.0),
            max_calls=self.integer(data, "max_calls", where, 1, 1_000_000),
            sampling=self.sampling(data, where),
            recording=self.recording(data, where),
            transcription=self.boolean(data, "transcription", where) if "transcription" in data else None,
            dtmf_clear=self.boolean(data, "dtmf_clear", where) if "dtmf_clear" in data else None,
            consent_announcement=self.announcement(data, "consent_announcement", where, ringing=False),
            line=data.line,
        )

    def match(self, data: Mapping, where: str, plan: NumberPlan) -> Match:
        if "match" not in data:
            return Match()
        spec = self.mapping(data["match"], data.line_of("match"), f"{where}: 'match'")
        self.known(spec, f"{where}: 'match'", ("number", "prefix", "pattern", "source", "digest_user"))
        numbers = frozenset(plan.canonical(n) for n in self.strings(spec, "number", where))
        prefixes = tuple(plan.canonical(p) for p in self.strings(spec, "prefix", where))
        patterns = []
        for text in self.strings(spec, "pattern", where):
            if len(text) > MAX_PATTERN_CHARS:
                raise RoutesError(
                    spec.line_of("pattern"), f"{where}: a pattern is at most {MAX_PATTERN_CHARS} characters"
                )
            try:
                patterns.append(re.compile(text))
            except re.error as exc:
                raise RoutesError(spec.line_of("pattern"), f"{where}: pattern {text!r}: {exc}") from None
        sources = None
        if "source" in spec:
            try:
                sources = AddressList.parse(self.strings(spec, "source", where))
            except ValueError as exc:
                raise RoutesError(spec.line_of("source"), f"{where}: 'source': {exc}") from None
        users = frozenset(self.strings(spec, "digest_user", where))
        if users and not self.digest_users:
            raise RoutesError(
                spec.line_of("digest_user"),
                f"{where}: 'digest_user' needs digest authentication "
                "of INVITEs (MOSHIMOSHI_SIP_AUTH or MOSHIMOSHI_SIP_AUTH_FILE)",
            )
        return Match(numbers=numbers, prefixes=prefixes, patterns=tuple(patterns), sources=sources, digest_users=users)

    def dtmf(self, data: Mapping, where: str, fallback: str | None) -> dict[str, DtmfAction]:
        if "dtmf" not in data:
            return {}
        spec = self.mapping(data["dtmf"], data.line_of("dtmf"), f"{where}: 'dtmf'")
        actions: dict[str, DtmfAction] = {}
        for key, value in spec.items():
            line = spec.line_of(key)
            digit = str(key).upper() if isinstance(key, (str, int)) and not isinstance(key, bool) else ""
            if digit not in DTMF_KEYS:
                raise RoutesError(line, f"{where}: DTMF key {key!r} is not one of 0-9, *, #, A-D (quote * and #)")
            target = None
            if isinstance(value, Mapping):
                self.known(value, f"{where}: DTMF {digit}", ("action", "target"))
                action = value.get("action")
                target = self.target(value, "target", where)
            else:
                action = value
            if action not in DTMF_ACTIONS:
                raise RoutesError(line, f"{where}: DTMF {digit}: the action must be one of {', '.join(DTMF_ACTIONS)}")
            if action == "transfer" and not (target or fallback):
                raise RoutesError(line, f"{where}: DTMF {digit} transfers, but the route has no 'fallback' target")
            actions[digit] = DtmfAction(action, target)
        return actions

    def overflow(self, data: Mapping, where: str, fallback: str | None) -> Overflow:
        if "overflow" not in data:
            return Overflow()
        value = data["overflow"]
        line = data.line_of("overflow")
        if isinstance(value, str):
            if value not in ("reject", "transfer"):
                raise RoutesError(
                    line,
                    f"{where}: 'overflow' must be reject, transfer, or a mapping with "
                    "action: message and the message's file",
                )
            spec = Mapping({"action": value})
            spec.line, spec.key_lines = line, {}
        else:
            spec = self.mapping(value, line, f"{where}: 'overflow'")
        self.known(spec, f"{where}: 'overflow'", ("action", "message", "target"))
        action = spec.get("action")
        if action not in OVERFLOW_ACTIONS:
            raise RoutesError(
                spec.line_of("action"), f"{where}: overflow action must be one of {', '.join(OVERFLOW_ACTIONS)}"
            )
        message = self.announcement(spec, "message", where, ringing=False)
        if action == "message" and message is None:
            raise RoutesError(spec.line, f"{where}: overflow 'message' needs the message to play (a WAV file)")
        target = self.target(spec, "target", where)
        if action == "transfer" and not (target or fallback):
            raise RoutesError(spec.line, f"{where}: overflow transfers, but there is no 'target' nor 'fallback'")
        return Overflow(action=action, message=message, target=target)

    def recording(self, data: Mapping, where: str) -> Recording | None:
        if "recording" not in data:
            return None
        value = data["recording"]
        line = data.line_of("recording")
        human: bool | None = None
        if isinstance(value, Mapping):
            self.known(value, f"{where}: 'recording'", ("format", "human_part"))
            if "human_part" in value:
                human = self.boolean(value, "human_part", where)
            line = value.line_of("format")
            value = value.get("format", "wav")
        if value is False:  # YAML 1.1 reads a bare off as false
            value = "off"
        if value not in RECORDING_FORMATS:
            raise RoutesError(line, f"{where}: recording must be one of {', '.join(RECORDING_FORMATS)}")
        return Recording(format=value, human_part=human)

    def sampling(self, data: Mapping, where: str) -> dict[str, float | int | bool]:
        if "sampling" not in data:
            return {}
        spec = self.mapping(data["sampling"], data.line_of("sampling"), f"{where}: 'sampling'")
        self.known(spec, f"{where}: 'sampling'", (*SAMPLING_FLOATS, *SAMPLING_INTS, "greedy"))
        out: dict[str, float | int | bool] = {}
        for name in SAMPLING_FLOATS:
            value = self.number(spec, name, where, 0.0, MAX_TEMPERATURE)
            if value is not None:
                out[name] = value
        for name in SAMPLING_INTS:
            count = self.integer(spec, name, where, 1, MAX_TOP_K)
            if count is not None:
                out[name] = count
        if "greedy" in spec:
            out["greedy"] = self.boolean(spec, "greedy", where)
        return out

    def announcement(self, data: Mapping, key: str, where: str, *, ringing: bool = True) -> Announcement | None:
        value = data.get(key)
        if value is None:
            return None
        line = data.line_of(key)
        if not isinstance(value, str) or not value.strip():
            raise RoutesError(
                line,
                f"{where}: '{key}' must be a WAV file's path or one of "
                f"{', '.join(((RINGING,) if ringing else ()) + TONES)}",
            )
        if value == RINGING and ringing:
            return Announcement(RINGING, RINGING)
        if value in TONES:
            return Announcement("tone", value)
        path = Path(value)
        if not path.is_absolute():
            path = self.base / path
        if self.check_file is not None:
            try:
                self.check_file(str(path))
            except (OSError, ValueError) as exc:
                raise RoutesError(line, f"{where}: '{key}': {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return Announcement("file", str(path))

    # -- values ------------------------------------------------------------------------

    @staticmethod
    def mapping(value: tp.Any, line: int, what: str) -> Mapping:
        if not isinstance(value, Mapping):
            raise RoutesError(line, f"{what} must be a mapping (key: value lines)")
        return value

    @staticmethod
    def known(data: Mapping, where: str, keys: tuple[str, ...]) -> None:
        for key in data:
            if key not in keys:
                raise RoutesError(data.line_of(key), f"{where}: unknown key {key!r} (known: {', '.join(keys)})")

    @staticmethod
    def strings(data: Mapping, key: str, where: str) -> list[str]:
        value = data.get(key)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int)) or not str(item).strip():
                raise RoutesError(
                    data.line_of(key),
                    f"{where}: '{key}' takes text or a list of texts (quote numbers: \"+81312345678\")",
                )
            out.append(str(item).strip())
        return out

    @staticmethod
    def digits(data: Mapping, key: str, default: str, *, empty: bool = False) -> str:
        value = data.get(key, default)
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text is None or not (text.isdigit() or (empty and text == "")) or len(text) > 8:
            raise RoutesError(data.line_of(key), f"'{key}' must be digits (quoted, e.g. \"{default}\")")
        return text

    @staticmethod
    def number(data: Mapping, key: str, where: str, low: float, high: float) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            raise RoutesError(data.line_of(key), f"{where}: '{key}' must be a number from {low:g} to {high:g}")
        return float(value)

    @staticmethod
    def integer(data: Mapping, key: str, where: str, low: int, high: int) -> int | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise RoutesError(data.line_of(key), f"{where}: '{key}' must be a whole number from {low} to {high}")
        return value

    @staticmethod
    def boolean(data: Mapping, key: str, where: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise RoutesError(data.line_of(key), f"{where}: '{key}' must be true or false")
        return value

    @staticmethod
    def target(data: Mapping, key: str, where: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        problem = target_problem(value)
        if problem is not None:
            raise RoutesError(data.line_of(key), f"{where}: '{key}': {problem}")
        return tp.cast(str, value)

    @staticmethod
    def route_name(data: Mapping, key: str, names: set[str], *, allow_reject: bool) -> str | None:
        value = data.get(key)
        if value is None or (allow_reject and value == "reject"):
            return None
        if value not in names:
            choices = "reject or " if allow_reject else ""
            raise RoutesError(data.line_of(key), f"'{key}' must be {choices}the name of a route, not {value!r}")
        return tp.cast(str, value)


TEL = re.compile(r"tel:\+?[0-9*#][0-9*#.()-]{0,31}")


def target_problem(value: tp.Any) -> str | None:
    """Why ``value`` is not a transfer target (a sip:, sips: or tel: URI), or None."""
    from sip.errors import SipParseError
    from sip.uri import SipUri

    if not isinstance(value, str) or len(value) > 512:
        return "a target is a sip:, sips: or tel: URI"
    if value.startswith("tel:"):
        return None if TEL.fullmatch(value) else f"{value!r} is not a tel: number"
    if not value.startswith(("sip:", "sips:")):
        return f"{value!r} is not a sip:, sips: or tel: URI"
    try:
        SipUri.parse(value, "target")
    except SipParseError as exc:
        return str(exc)
    return None


def parse(
    data: tp.Any, *, base: Path, check_file: tp.Callable[[str], None] | None = None, digest_users: bool = True
) -> RouteSet:
    """A routes document (as ``yamlfile.load`` returns it) checked into a :class:`RouteSet`;
    raises :class:`RoutesError`. ``check_file(path)`` vets each WAV file named (raising
    OSError or ValueError); ``digest_users`` says whether INVITEs are authenticated, which
    a ``digest_user`` match needs."""
    return _Reader(base, check_file, digest_users).parse(data)
