"""Serve recorded API responses byte for byte, by the file-name rule of the fixtures' README."""

from __future__ import annotations

import pathlib
from urllib.parse import parse_qsl

from aiohttp import web

from options.simulator.app import JSON, error_response

# (path without the leading slash, sorted decoded query pairs) -> the recorded body.
_Key = tuple[str, tuple[tuple[str, str], ...]]
RECORDINGS = web.AppKey("recordings", dict[_Key, bytes])


def create_fixture_app(fixtures_dir: pathlib.Path) -> web.Application:
    """Build an app that answers each request with the recorded file its URL maps to.

    ``a/b&cursor=X.json`` answers ``/a/b?cursor=X``; ``a/b.json`` (or ``a/b/index.json``) answers
    ``/a/b`` with any query but a cursor; ``;`` in a file name stands for ``:``. Queries compare
    decoded, so ``%2C`` and ``,`` match. Unknown URLs get 404; there is no auth check. Files are
    read once, here, so handlers never block on disk.
    """
    root = pathlib.Path(fixtures_dir)
    recordings: dict[_Key, bytes] = {}
    for path in root.rglob("*.json"):
        name = path.relative_to(root).as_posix().removesuffix(".json").replace(";", ":", 1)
        if name == "index" or name.endswith("/index"):
            name = name.removesuffix("index").rstrip("/")
        url_path, _, query = name.partition("&")
        recordings[(url_path, _canonical(parse_qsl(query)))] = path.read_bytes()
    app = web.Application()
    app[RECORDINGS] = recordings
    app.router.add_get("/{tail:.*}", _serve_recording)
    return app


def _canonical(pairs: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    # The key may ride in the query; the recordings were made without it.
    return tuple(sorted(pair for pair in pairs if pair[0] != "apiKey"))


async def _serve_recording(request: web.Request) -> web.Response:
    recordings = request.app[RECORDINGS]
    path = request.path.strip("/")
    query = _canonical(list(request.query.items()))
    cursor = request.query.get("cursor")
    fallback: tuple[tuple[str, str], ...] = () if cursor is None else (("cursor", cursor),)
    body = recordings.get((path, query))
    if body is None:
        body = recordings.get((path, fallback))
    if body is None:
        return error_response(404, "No recording for this URL.", api_status="NOT_FOUND")
    return web.Response(body=body, content_type=JSON)
