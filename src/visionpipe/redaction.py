"""Keep secrets out of logs, MLflow params and tags, and error messages."""

from __future__ import annotations

import re

# scheme://user:password@ and scheme://:token@ (userinfo with a secret part)
_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@")


def redact(text: str) -> str:
    """Hide passwords inside URLs (``postgresql://user:secret@host`` -> ``user:***@host``)."""
    return _SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
