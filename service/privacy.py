"""A logging filter that keeps addresses, tokens and query strings out of every log line,
whatever the verbosity (Sanic's error logger prints request URLs, its access log prints
``ip:port``).  ``install()`` attaches it to every handler and logger that exists, and to the
root logger so that later handlers are covered too; call it after Sanic configured logging."""

from __future__ import annotations

import logging
import re
import traceback

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # JWTs anywhere (header.payload.signature, base64url)
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "<token>"),
    # query strings of URLs and request lines
    (re.compile(r"(\b(?:wss?|https?)://[^\s?'\"]*|\s/[^\s?'\"]*)\?[^\s'\"]*"), r"\1?<redacted>"),
    (re.compile(r"(?i)\b(token|access_token|jwt)=[^\s&'\"]+"), r"\1=<redacted>"),
    (re.compile(r"(?i)\b(bearer)[ .][A-Za-z0-9._~+/=-]+"), r"\1 <redacted>"),
    # IPv4 with optional port, IPv6 (bracketed or bare, at least two colons)
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<addr>"),
    (re.compile(r"\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\](?::\d+)?"), "<addr>"),
    (re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"), "<addr>"),
]


def scrub(text: str) -> str:
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactFilter(logging.Filter):
    """Rewrites the record in place: message, args and traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg = scrub(message)
        record.args = None
        if record.exc_info:
            record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        # Sanic's access formatter reads these extras directly
        for attr in ("host", "request", "remote", "ip"):
            if hasattr(record, attr):
                setattr(record, attr, scrub(str(getattr(record, attr))))
        return True


_FILTER = RedactFilter()


def install() -> None:
    """Attach the filter everywhere; idempotent."""
    names = ["", *logging.root.manager.loggerDict]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
