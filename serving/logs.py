"""Log lines an operator can trust: control characters in a message are escaped, never written raw.

Model names in URLs, headers and request ids reach log messages (KServe's own among them); an
encoded newline (``%0A``) in one would otherwise start a forged log line. :class:`EscapeControlChars`
sits on every handler, so it covers records from any logger, whoever formats the message.
"""

from __future__ import annotations

import logging
import re

#: C0 and C1 control characters, DEL and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_control(text: str) -> str:
    """``text`` with each control character as a backslash escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL.sub(_escape_char, text)


class EscapeControlChars(logging.Filter):
    """Handler filter: the rendered message becomes one line (tracebacks are formatted apart)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        escaped = escape_control(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def install_escaping() -> int:
    """Add :class:`EscapeControlChars` to every handler configured now; returns how many got it.

    Call once logging is configured (our basicConfig and KServe's dictConfig both ran).
    """
    registered = logging.Logger.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(lg for lg in registered if isinstance(lg, logging.Logger))]
    added = 0
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, EscapeControlChars) for f in handler.filters):
                handler.addFilter(EscapeControlChars())
                added += 1
    return added
