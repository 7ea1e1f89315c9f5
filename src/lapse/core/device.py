"""A short device label for a session ("Firefox on Android", "curl"), shown to its user and to admins.

Why rules and not a library: the maintained parser (ua-parser) ships thousands
of regular expressions to name every phone model; a user deciding "is that
session mine?" needs the browser and the operating system, which a handful of
product tokens give. The label is built only from the fixed words below, so
the raw User-Agent (free text a client chose) is never stored or shown, and
every label fits in ``MAX_LEN`` characters.

Known limits, said plainly: iPadOS in desktop mode claims to be a Mac (it
reads "Safari on macOS"), and browsers that hide behind Chrome's token
(Brave, recent Vivaldi) read as Chrome. The User-Agent is the client's claim,
not evidence: the label helps a person recognise a session, nothing more.
"""

from __future__ import annotations

MAX_LEN = 40
UNKNOWN = "Unknown device"
POSTGRES_CLIENT = "PostgreSQL client"
SCAN = 512  # characters of the header looked at: the tokens sit early, and the work stays bounded

# Command-line tools and HTTP libraries: the User-Agent starts with their product token.
TOOLS = (
    ("curl/", "curl"),
    ("wget/", "Wget"),
    ("httpie/", "HTTPie"),
    ("python-requests/", "Python requests"),
    ("python-httpx/", "Python httpx"),
    ("python-urllib/", "Python urllib"),
    ("go-http-client/", "Go HTTP client"),
    ("okhttp/", "OkHttp"),
    ("postmanruntime/", "Postman"),
    ("node-fetch", "Node.js"),
    ("undici", "Node.js"),
    ("axios/", "Node.js"),
    ("java/", "Java"),
)

# First match wins: a browser's User-Agent also names those it grew from (Edge says Chrome and Safari).
BROWSERS = (
    ("Edge", ("Edg/", "EdgA/", "EdgiOS/", "Edge/")),
    ("Opera", ("OPR/", "OPT/", "Opera")),
    ("Samsung Internet", ("SamsungBrowser/",)),
    ("Firefox", ("Firefox/", "FxiOS/")),
    ("Chromium", ("Chromium/",)),
    ("Chrome", ("Chrome/", "CriOS/")),
    ("Safari", ("Safari/",)),
)

# First match wins: Android and ChromeOS say Linux; iOS says "like Mac OS X".
SYSTEMS = (
    ("Android", ("Android",)),
    ("iOS", ("iPhone", "iPad", "iPod")),
    ("ChromeOS", ("CrOS",)),
    ("Windows", ("Windows",)),
    ("macOS", ("Macintosh", "Mac OS X")),
    ("Linux", ("Linux",)),
)


def _first(text: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    for name, tokens in table:
        if any(token in text for token in tokens):
            return name
    return None


def from_user_agent(user_agent: str | None) -> str:
    """"Chrome on Linux", "Firefox", "Android device", "curl" or ``UNKNOWN``; never the header itself."""
    ua = (user_agent or "")[:SCAN].strip()
    lowered = ua.lower()
    for token, tool in TOOLS:
        if lowered.startswith(token):
            return tool
    browser, system = _first(ua, BROWSERS), _first(ua, SYSTEMS)
    if browser and system:
        return f"{browser} on {system}"
    if browser:
        return browser
    if system:
        return f"{system} device"
    return UNKNOWN


def from_application_name(name: str | None) -> str:
    """PostgreSQL's ``application_name`` ("psql", "DBeaver 23.1"), printable, at most ``MAX_LEN`` characters.

    It is the client's free text (unlike a User-Agent, it usually is a short
    program name): control characters go, whitespace collapses, and a client
    that sends none is a ``POSTGRES_CLIENT``.
    """
    text = " ".join("".join(c if c.isprintable() else " " for c in (name or "")[:SCAN]).split())
    return text[:MAX_LEN].rstrip() or POSTGRES_CLIENT

