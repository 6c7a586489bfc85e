"""Secrets out of everything the project shows or saves (configs, run.json, logs, errors, metrics,
reports, the judge cache's identity).

Keys live in the environment (`api_key_env`), but some providers take one inside the endpoint URL:
in the query string (`https://host/v1?key=...`) or as userinfo (`https://user:secret@host/v1`).
`redact_url` masks those parts and keeps the rest of the URL readable (scheme, host, path and
query parameters that are not secret), so a message can still say which endpoint failed.
"""

import re
import urllib.parse
from typing import Iterable, List

REDACTED = "***REDACTED***"
# config keys whose values are secrets wherever they appear
SECRET_KEY = re.compile(r"(^|_)(api_?key|secret|password|passwd|token|access_token|auth_token|hf_token)$", re.I)
# config keys whose every value is a secret (HTTP headers can carry keys: `api-key`, `Authorization`)
SECRET_MAPPINGS = ("default_headers",)
# query parameters that carry credentials: key, api_key, api-key, apikey, access_token, sig, ...
_SECRET_PARAM = re.compile(r"key|token|secret|pass|sig|auth|cred|session", re.I)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\],]+")


def redact_url(url: str) -> str:
    """`url` with its userinfo and the values of credential-like query parameters masked."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not parseable as a URL: show nothing of it that could be a secret
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}={REDACTED}" if eq and _SECRET_PARAM.search(urllib.parse.unquote(name)) else param


def redact_text(text: str) -> str:
    """Every URL inside `text` through `redact_url` (error messages quote the endpoint)."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def url_secrets(url: str) -> List[str]:
    """The secret pieces of a URL (userinfo, credential query values), to mask wherever they show
    up without their URL around them (a server that echoes the key it was sent)."""
    parts = urllib.parse.urlsplit(url)
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found += [userinfo, *userinfo.split(":", 1)[1:]]
    found += [v for k, v in urllib.parse.parse_qsl(parts.query) if _SECRET_PARAM.search(k) and v]
    return found


MIN_SECRET = 6  # shorter values (a routing header's "1") would shred every message they occur in


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every URL redacted and each of `secrets` (longest first) replaced."""
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return redact_text(text)
