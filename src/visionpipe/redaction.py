"""Keep secrets out of logs, MLflow params and tags, and error messages."""

from __future__ import annotations

import re

# scheme://user:password@ and scheme://:token@ (userinfo with a secret part)
_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@")
# scheme://TOKEN@host: userinfo without a colon is a bare token (GitHub, many mirrors)
_TOKEN_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^:/?#@\s'\"]+@")
# Presigned URLs (S3 SigV2/SigV4, GCS, Azure SAS) and token query parameters: the value is the
# secret, up to the next parameter, fragment, whitespace or quote.
_SECRET_PARAMS = (
    r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    r"|awsaccesskeyid|signature|sig|token|access_token|api_key|apikey|password|secret"
)
_SECRET_IN_QUERY = re.compile(rf"(?P<name>[?&;](?:{_SECRET_PARAMS})=)[^&#\s'\"<>]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide secrets inside URLs.

    ``postgresql://user:secret@host`` -> ``user:***@host``; ``https://TOKEN@host`` ->
    ``https://***@host``; ``?X-Amz-Signature=...`` (and ``X-Amz-Credential``, ``Signature``,
    ``sig``, ``token``, ...) -> ``?X-Amz-Signature=***``.
    """
    text = _SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _TOKEN_IN_URL.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_IN_QUERY.sub(lambda m: f"{m['name']}***", text)
