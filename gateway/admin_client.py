"""A small synchronous client for a running gateway's admin HTTP API (keys, limits, usage).

The `sluicegate keys`, `budgets` and `usage` commands use it: the gateway package may not
import the layers that serve these routes, so it speaks to them over HTTP, standard library
only. The admin token goes in the Authorization header and nowhere else: not in errors, not
in `repr`, and never to another host (redirects are refused rather than followed).
"""
from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson

from gateway.doctor import redact_target

_MAX_ERROR_CHARS = 300


class AdminError(Exception):
    """The admin API refused a request (`status` is its HTTP status, 0 when the gateway
    could not be reached); `message` is the API's own error message."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.code = code


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would resend the Authorization header to wherever a redirect points.
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        return None


class AdminClient:
    """The admin API of the gateway at `url` (e.g. http://127.0.0.1:8080), with `token`."""

    def __init__(self, url: str, token: str, timeout_s: float = 10) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the gateway URL must be http:// or https:// with a host")
        if "@" in parts.netloc:
            # A proxy's user and password could only go as Basic auth, in the Authorization
            # header the admin token holds; urllib would take them for the host (and its
            # error print the password).
            raise ValueError("the gateway URL must not hold a user name or password "
                             "(user:password@): the admin API takes the admin token alone")
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise ValueError("the admin token must be printable ASCII without spaces")
        self.url = url.rstrip("/")
        self.shown_url = redact_target(self.url)  # (in messages: no query string)
        self.timeout_s = timeout_s
        self._authorization = f"Bearer {token}"
        self._opener = urllib.request.build_opener(_RefuseRedirects)

    def __repr__(self) -> str:  # never the token
        return f"AdminClient(url={self.shown_url!r})"

    # -- keys --------------------------------------------------------------------------------

    def create_key(self, project: str, **settings: Any) -> dict[str, Any]:
        """POST /admin/keys: the response holds the plaintext `key`, shown only this once.
        `settings`: allowed_models, expires_at (ISO 8601), require_customer, metadata,
        limits (the `Limits.to_json` shape)."""
        return self._call("POST", "/admin/keys", {"project": project, **settings})

    def list_keys(self, project: str | None = None, *, status: str | None = None,
                  page_size: int = 1000) -> list[dict[str, Any]]:
        """Every key (of `project`, of `status`): the pages of GET /admin/keys, in turn."""
        query: dict[str, str] = {"limit": str(page_size)}
        if project is not None:
            query["project"] = project
        if status is not None:
            query["status"] = status
        keys: list[dict[str, Any]] = []
        while True:
            page = self._call("GET", "/admin/keys", query=query)
            keys += _data(page)
            if not page.get("has_more") or not page.get("last_id"):
                return keys
            query["after"] = str(page["last_id"])

    def get_key(self, key_id: str) -> dict[str, Any]:
        return self._call("GET", f"/admin/keys/{_segment(key_id)}")

    def update_key(self, key_id: str, **fields: Any) -> dict[str, Any]:
        return self._call("PATCH", f"/admin/keys/{_segment(key_id)}", fields)

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._call("POST", f"/admin/keys/{_segment(key_id)}/revoke")

    def rotate_key(self, key_id: str) -> dict[str, Any]:
        """The response holds the new plaintext `key`, shown only this once."""
        return self._call("POST", f"/admin/keys/{_segment(key_id)}/rotate")

    # -- limits and usage --------------------------------------------------------------------

    def list_limits(self, kind: str | None = None) -> list[dict[str, Any]]:
        query = {"kind": kind} if kind is not None else None
        return _data(self._call("GET", "/admin/limits", query=query))

    def get_limits(self, kind: str, subject_id: str) -> dict[str, Any]:
        return self._call("GET", _limits_path(kind, subject_id))

    def put_limits(self, kind: str, subject_id: str,
                   limits: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("PUT", _limits_path(kind, subject_id), limits)

    def delete_limits(self, kind: str, subject_id: str) -> dict[str, Any]:
        return self._call("DELETE", _limits_path(kind, subject_id))

    def usage(self, kind: str, subject: str) -> dict[str, Any]:
        """GET /admin/usage/{kind}/{subject}: committed spend per period (quota layer)."""
        return self._call("GET", f"/admin/usage/{_segment(kind)}/{quote(subject, safe='/')}")

    def usage_totals(self, group_by: str, *, since: str | None = None, until: str | None = None,
                     grain: str | None = None) -> dict[str, Any]:
        """GET /admin/usage: totals per key, project, customer or model from the metering
        layer's rollups; `since` and `until` are ISO 8601 (the gateway's defaults: the last
        30 days), `grain` "day" or "minute"."""
        query = {"group_by": group_by, "since": since, "until": until, "grain": grain}
        return self._call("GET", "/admin/usage",
                          query={name: value for name, value in query.items() if value is not None})

    # -- transport ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None,
              query: Mapping[str, str] | None = None) -> dict[str, Any]:
        url = self.url + path + (f"?{urlencode(query)}" if query else "")
        data = orjson.dumps(dict(body)) if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", self._authorization)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            exc.close()
            raise _api_error(exc.code, raw) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            reason = getattr(reason, "strerror", None) or reason
            raise AdminError(0, f"Cannot reach the gateway at {self.shown_url}: "
                                f"{reason}.") from None
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            raise AdminError(status, "The gateway answered with something other than a JSON "
                                     "object.")
        return payload


def _api_error(status: int, raw: bytes) -> AdminError:
    """The API's own message from an OpenAI-shaped error body, or a trimmed excerpt."""
    if 300 <= status < 400:
        return AdminError(status, "The gateway URL redirects elsewhere; give the final URL "
                                  "with --url (the admin token is not sent on redirects).")
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        return AdminError(status, _one_line(error["message"]),
                          code=code if isinstance(code, str) else None)
    text = _one_line(raw.decode("utf-8", "replace"))
    return AdminError(status, text or "The gateway answered with an empty error.")


def _one_line(text: str) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 1] + "…"


def _data(payload: dict[str, Any]) -> list[dict[str, Any]]:
    data = payload.get("data")
    if not isinstance(data, list):
        raise AdminError(200, "The gateway answered a list request without a 'data' list.")
    return data


def _segment(value: str) -> str:
    return quote(value, safe="")


def _limits_path(kind: str, subject_id: str) -> str:
    # Customer ids are "<project>/<customer>" and the customer may hold a '/' too (or end
    # with one): one segment each, the customer's slashes encoded.
    parts = subject_id.split("/", 1) if kind == "customer" else [subject_id]
    return f"/admin/limits/{_segment(kind)}/" + "/".join(_segment(part) for part in parts)
