"""The HTTP + WebSocket API of ``vrex serve`` (FastAPI; the OpenAPI page is at ``/docs``).

Security model: every ``/api`` request carries the token when one is set (``Authorization: Bearer``,
or ``?token=`` for WebSockets and thumbnails); a request with an ``Origin`` header from another
site is refused on WebSockets and on every non-GET request (a web page elsewhere cannot drive a
local server); bodies are read with a byte limit before anything is decoded.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect
from starlette.websockets import WebSocketDisconnect

from vrex.serve.hub import Hub
from vrex.serve.limits import ClientError, check_question, decode_frame
from vrex.serve.live import LiveSession, SessionSettings
from vrex.serve.sources import SourcePlayer, check_url, list_media, media_path

WS_QUEUE = 256  # messages buffered per WebSocket client; a slower client loses the oldest


class SessionCreate(BaseModel):
    policy: str = Field("full", description="KV policy name or spec string, as `vrex run --policy` (e.g. `resv`, `resv[ratio=0.2]`).")
    fps: float = Field(2.0, description="Frames per second the session takes; faster frames are dropped and counted.")
    theta: float = Field(0.725, description="Streaming-EOS threshold: narrate when P(interval) < theta; 0 = answer only.")
    min_response_gap: float = Field(0.0, description="Seconds of silence after a narration.")
    recent_tokens: Optional[int] = Field(None, description="Always-kept newest tokens (default: the last two frames).")


class Ask(BaseModel):
    text: str = Field(..., description="The question.")
    wait: bool = Field(False, description="Block until the answer (with its timeline) is ready.")
    timeout: float = Field(120.0, gt=0, le=600, description="Seconds to wait when `wait` is true.")


class SourceRequest(BaseModel):
    url: Optional[str] = Field(None, description="A stream URL (needs --allow-urls).")
    media: Optional[str] = Field(None, description="A file name inside the server's --media-dir.")


def _error(e: ClientError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


def _same_origin(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    if not origin:
        return True  # not a browser page (curl, Python clients): nothing to forge
    if origin in allowed:
        return True
    return bool(host) and urlsplit(origin).netloc == host


def _token_ok(expected: str | None, headers: Any, query: Any) -> bool:
    if expected is None:
        return True
    auth = headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-vrex-token") or query.get("token") or ""
    return secrets.compare_digest(given.encode(), expected.encode())


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"{what} of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"{what} exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(hub: Hub) -> FastAPI:
    config = hub.config
    limits = config.limits
    app = FastAPI(title="vrex serve", description="Live video assistant: stream frames, read narrations, ask questions, "
                  "see which moments each answer read (per-frame KV read shares).", version="1")

    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError) -> JSONResponse:
        return _error(e)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/api"):
            if request.method not in ("GET", "HEAD", "OPTIONS") and not _same_origin(
                    request.headers.get("origin"), request.headers.get("host"), config.allowed_origins):
                return JSONResponse({"error": f"origin {request.headers.get('origin')} is not allowed"}, status_code=403)
            if not _token_ok(config.token, request.headers, request.query_params):
                return JSONResponse({"error": "missing or wrong token: send 'Authorization: Bearer <token>'"}, status_code=401)
        try:
            return await call_next(request)
        except ClientDisconnect:
            return Response(status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(resources.files("vrex.serve").joinpath("static/index.html").read_text())

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok" if hub.worker.alive() else "degraded", "worker": hub.worker.alive(),
                "sessions": sum(s.state == "live" for s in hub.list()), "auth": config.token is not None}

    @app.get("/api/config")
    def server_config() -> dict[str, Any]:
        return {"policies": hub.policies(), "default_policy": config.default_policy, "limits": limits.__dict__,
                "media": list_media(config.media_dir), "allow_urls": config.allow_urls, "saves_sessions": hub.saved is not None,
                "model": hub.model_name(), "cluster": hub.cluster.describe() if hub.cluster is not None else None}

    @app.post("/api/sessions", status_code=201)
    def create_session(body: SessionCreate) -> dict[str, Any]:
        session = hub.create(SessionSettings(policy=body.policy, fps=body.fps, theta=body.theta,
                                             min_response_gap=body.min_response_gap, recent_tokens=body.recent_tokens))
        return session.describe()

    @app.get("/api/sessions")
    def list_sessions(saved: bool = Query(False, description="Also list the sessions saved in --sessions-dir but not loaded (state `saved`).")) -> list[dict[str, Any]]:
        live = [s.describe() for s in hub.list()]
        if saved and hub.saved is not None:
            ids = {s["id"] for s in live}
            live += [s for s in hub.saved.saved() if s["id"] not in ids]
        return live

    @app.post("/api/sessions/{sid}/resume")
    def resume_session(sid: str) -> dict[str, Any]:
        """Resume a session saved by a server started with `--sessions-dir DIR` (this one, or an earlier
        one on the same DIR that stopped or crashed): it continues from its last save, exactly as if it
        had never stopped (greedy decoding). `resumed` says where (`frame`: frames it holds, `t`: the
        last one's time): send the frames after `t`. A failed session is replaced by its last save; a
        live one is returned as is. With `vrex serve --cluster`, a session whose Ray actor died (its
        error names the session, the actor's host and pid, the cause) is rebuilt in place on a new
        actor: its event numbers and WebSockets go on. Any other request naming a saved session's id resumes it too, so a
        client that reconnects with its id just goes on. 404: no such saved session; 409: it cannot
        resume (damaged, saved with another model); 429: the server is full."""
        session = hub.resume(sid)
        s = session.session
        return {**session.describe(), "resumed": {"t": round(s.t, 3), "frame": s.frames, "cached_tokens": s.cached_tokens}}

    @app.get("/api/sessions/{sid}")
    def get_session(sid: str) -> dict[str, Any]:
        return hub.get(sid).describe()

    @app.delete("/api/sessions/{sid}")
    def delete_session(sid: str) -> dict[str, Any]:
        hub.remove(sid)
        return {"closed": sid}

    @app.post("/api/sessions/{sid}/frames", status_code=202,
              openapi_extra={"requestBody": {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
    async def post_frame(sid: str, request: Request, t: Optional[float] = Query(None, description="Stream time in s (default: arrival).")) -> dict[str, Any]:
        """One frame as the raw request body (JPEG, PNG or WebP)."""
        session = await _session(hub, sid)
        data = await _read_body(request, limits.max_frame_bytes, "frame")
        image = await asyncio.to_thread(decode_frame, data, limits)
        accepted = session.offer_frame(image, t)
        return {"accepted": accepted, **session.counts()}

    @app.post("/api/sessions/{sid}/ask")
    async def ask(sid: str, body: Ask) -> dict[str, Any]:
        """Queue a question; with `wait`, return its answer and the timeline of what it read."""
        session = await _session(hub, sid)
        text = check_question(body.text, limits)
        if not body.wait:
            return {"id": session.ask(text)}
        queue: asyncio.Queue = asyncio.Queue()
        unsubscribe = session.subscribe(_threadsafe_put(asyncio.get_running_loop(), queue))
        try:
            qid = session.ask(text)
            async with asyncio.timeout(body.timeout):
                while True:
                    msg = await queue.get()
                    if msg.get("type") == "answer" and msg.get("id") == qid:
                        return msg
                    if msg.get("fatal") or msg.get("type") == "closed":
                        raise ClientError(409, f"session {sid} stopped before answering: {msg.get('message') or msg.get('reason')}")
        except TimeoutError:
            raise ClientError(504, f"no answer within {body.timeout} s (question {qid} stays queued)") from None
        finally:
            unsubscribe()

    @app.get("/api/sessions/{sid}/events")
    async def events(sid: str, after: int = 0, wait: float = Query(0.0, ge=0, le=30)) -> list[dict[str, Any]]:
        """Events with `seq` > `after` (frame stats, narrations, answers, errors); `wait` long-polls."""
        session = await _session(hub, sid)
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            out = session.events_after(after)
            if out or asyncio.get_running_loop().time() >= deadline:
                return out
            await asyncio.sleep(0.05)

    @app.get("/api/sessions/{sid}/history")
    async def history(sid: str) -> dict[str, Any]:
        """The narrations and answers so far (oldest first; their timelines from `answers/{id}`; after a
        resume from disk, `read_kept` is false: what they read is not saved), questions still waiting,
        the last frame's stats and `seq`: open the WebSocket first, then take events with `seq` above
        it from there. The page uses this to come back after a reload."""
        session = await _session(hub, sid)
        return session.history()

    @app.get("/api/sessions/{sid}/answers/{aid}")
    def answer_timeline(sid: str, aid: str, layers: bool = False) -> dict[str, Any]:
        """Per-frame share of tokens read while answering (mean over layers and KV heads); `layers=true` adds [layer][frame]."""
        return hub.get(sid).timeline_json(aid, layers=layers)

    @app.get("/api/sessions/{sid}/frames/{fid}/thumb", response_class=Response)
    def thumb(sid: str, fid: int) -> Response:
        data = hub.get(sid).thumbs.get(fid)
        if data is None:
            raise ClientError(404, f"no thumbnail for frame {fid}")
        return Response(data, media_type="image/jpeg")

    @app.post("/api/sessions/{sid}/upload", openapi_extra={"requestBody": {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload(sid: str, request: Request, name: str = "upload") -> dict[str, Any]:
        """A video file as the raw body; the server plays it at real speed into the session."""
        session = await _session(hub, sid)
        session._check_live()
        suffix = Path(name).suffix[:8] or ".mp4"
        tmp = Path(tempfile.mkstemp(prefix="vrex-upload-", suffix=suffix)[1])
        try:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes:
                raise ClientError(413, f"upload of {declared} bytes exceeds the limit of {limits.max_upload_bytes} bytes")
            size = 0
            with tmp.open("wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limits.max_upload_bytes:
                        raise ClientError(413, f"upload exceeds the limit of {limits.max_upload_bytes} bytes")
                    f.write(chunk)
            if not size:
                raise ClientError(422, "empty upload: send the video file as the request body")
            player = await asyncio.to_thread(SourcePlayer, session, str(tmp), f"upload {Path(name).name}", session.settings.fps, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _replace_source(session, player)
        return {"source": player.describe(), "bytes": size}

    @app.post("/api/sessions/{sid}/source")
    async def set_source(sid: str, body: SourceRequest) -> dict[str, Any]:
        """Play a file from --media-dir or a URL (--allow-urls) into the session."""
        session = await _session(hub, sid)
        session._check_live()
        if (body.url is None) == (body.media is None):
            raise ClientError(422, "give exactly one of 'url' and 'media'")
        if body.url is not None:
            uri, label = check_url(body.url, config.allow_urls), body.url
        else:
            uri, label = str(media_path(body.media, config.media_dir)), body.media
        player = await asyncio.to_thread(SourcePlayer, session, uri, label, session.settings.fps)
        _replace_source(session, player)
        return {"source": player.describe()}

    @app.delete("/api/sessions/{sid}/source")
    def stop_source(sid: str) -> dict[str, Any]:
        session = hub.get(sid)
        if session.source is not None:
            session.source.stop()
        return {"stopped": True}

    @app.websocket("/api/sessions/{sid}/ws")
    async def stream(websocket: WebSocket, sid: str) -> None:
        """Binary messages: one image each. Text: {"type": "ask", "text": ...}. Server -> client: JSON events."""
        if not _same_origin(websocket.headers.get("origin"), websocket.headers.get("host"), config.allowed_origins):
            await websocket.close(code=1008, reason="origin not allowed")
            return
        if not _token_ok(config.token, websocket.headers, websocket.query_params):
            await websocket.close(code=1008, reason="missing or wrong token")
            return
        try:
            session = await _session(hub, sid)
        except ClientError as e:
            await websocket.close(code=1008, reason=e.message[:120])
            return
        await websocket.accept()
        queue: asyncio.Queue = asyncio.Queue(maxsize=WS_QUEUE)
        put = _threadsafe_put(asyncio.get_running_loop(), queue)
        put({"type": "hello", "session": session.describe()})
        unsubscribe = session.subscribe(put)
        sender = asyncio.create_task(_send_loop(websocket, queue))
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    await _handle_ws_message(session, msg, limits)
                except ClientError as e:
                    put({"type": "error", "fatal": False, "status": e.status, "message": e.message})
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            unsubscribe()
            sender.cancel()

    return app


async def _handle_ws_message(session: LiveSession, msg: dict[str, Any], limits: Any) -> None:
    if msg.get("bytes") is not None:
        image = await asyncio.to_thread(decode_frame, msg["bytes"], limits)
        session.offer_frame(image)
        return
    try:
        data = json.loads(msg.get("text") or "")
    except ValueError:
        raise ClientError(400, "text messages must be JSON, e.g. {\"type\": \"ask\", \"text\": \"What is shown?\"}") from None
    if not isinstance(data, dict) or data.get("type") != "ask":
        raise ClientError(400, "unknown message: send {\"type\": \"ask\", \"text\": ...} or a binary image frame")
    session.ask(check_question(data.get("text"), limits))


async def _session(hub: Hub, sid: str) -> LiveSession:
    """``hub.get`` off the event loop: it may resume a saved session (disk reads, the model lock)."""
    return await asyncio.to_thread(hub.get, sid)


def _threadsafe_put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    def put_now(msg: dict[str, Any]) -> None:
        if queue.full():  # a slow client loses the oldest message rather than stalling the worker
            queue.get_nowait()
        queue.put_nowait(msg)

    def put(msg: dict[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(put_now, msg)
        except RuntimeError:  # loop closed: the client is gone
            pass
    return put


async def _send_loop(websocket: WebSocket, queue: asyncio.Queue) -> None:
    try:
        while True:
            await websocket.send_text(json.dumps(await queue.get(), default=str))
    except Exception:  # noqa: BLE001 - the socket closed; the receive loop ends the handler
        pass


def _replace_source(session: LiveSession, player: SourcePlayer) -> None:
    if session.source is not None:
        session.source.stop()
    session.source = player.start()
