"""A local web page and JSON API that caption photos with a trained model (`--mode serve`).

FastAPI + uvicorn with one static page of our own (web/index.html) rather than Gradio: the page is
a single file with no scripts from elsewhere and no analytics calls (it works offline and sends the
photos nowhere), and the API underneath is the same one programs use. The model is loaded once; the
requests share it, one at a time (a lock), on the GPU when there is one.

Endpoints: `GET /` the page; `GET /api/health`; `POST /api/caption` with the image bytes as the
body (`?attention=1` adds the attention figure as a base64 PNG). Bad uploads get a 4xx with
`{"error": "..."}` and the server keeps serving.

Letters in shape comments: P encoder positions, C channels, L decoded length, H/W image height/width.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) as
# objects, and fastapi is imported inside create_app, where string annotations could not be resolved.
import base64
import io
import ipaddress
import logging
import socket
import tempfile
import threading
from pathlib import Path

import torch

import data_utils
import decoding
import plots
import test
from config import DecodeConfig, ServeConfig

logger = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = ServeConfig.host, ServeConfig.port
MAX_UPLOAD_BYTES = ServeConfig.max_upload_mb * 1024 * 1024
PAGE = Path(__file__).resolve().parent / "web" / "index.html"


class UploadError(ValueError):
    """A bad upload: the message is for the person who sent it, `status` the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def read_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES):
    """The uploaded bytes as an RGB PIL image, checked as training's images are (data_utils.load_image)."""
    if not data:
        raise UploadError("the upload is empty: choose a photo (JPEG, PNG, ...)")
    if len(data) > max_bytes:
        raise UploadError(f"the upload is {len(data) / 2**20:.1f} MiB, over the limit of "
                          f"{max_bytes / 2**20:.0f} MiB", status=413)
    # load_image reads a path: one implementation of the checks (pixel limit against decompression
    # bombs, truncation, EXIF rotation, RGB) for training, --mode test and this page.
    with tempfile.TemporaryDirectory(prefix="captioner-upload-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return data_utils.load_image(path)
        except data_utils.CorruptImageError as exc:
            # The reason names the temporary file: the sender knows it as "the upload".
            reason = str(exc).replace(f"{path}: ", "", 1).replace(f"'{path}'", "the upload")
            reason = reason.replace(str(path), "the upload")
            status = 413 if "decompression bomb" in reason else 400
            raise UploadError(f"not a readable image: {reason}", status=status) from None


def caption_image(captioner: test.Captioner, image, decode_cfg: DecodeConfig) -> dict:
    """Caption one PIL image: caption, words, score, the candidates and what the figure needs.

    The candidates are the beam's own K best finished captions with their scores, best first (one
    search, n_best=K); the caption is the first. Captions that read alike (they differ only in
    tokens the text drops) are listed once.
    """
    x = captioner.transform(image).unsqueeze(0)  # (1, 3, H, W)
    vocab = captioner.vocab
    with torch.inference_mode():
        out = decoding.decode(captioner.model, x.to(captioner.device), sos_id=vocab.sos_id, eos_id=vocab.eos_id,
                              unk_id=vocab.unk_id, cfg=decode_cfg, n_best=decode_cfg.beam_size)
    found = {}
    for tokens, score in zip(out.tokens, out.scores):
        caption = " ".join(vocab.decode(tokens))
        found.setdefault(caption, {"caption": caption, "score": round(score, 4)})
    words = vocab.decode(out.tokens[0])
    return {"caption": " ".join(words), "words": words, "score": round(out.scores[0], 4),
            "candidates": list(found.values()), "beam_size": decode_cfg.beam_size,
            "_alphas": out.alphas[0].float().cpu(), "_input": x[0]}  # (L, P), (3, H, W)


def attention_png(model_input, words: list[str], alphas, preprocess) -> bytes:
    """The --attention_map figure (photo + one panel per word) as PNG bytes."""
    fig = plots.attention_figure(test.display_image(model_input, preprocess), words, alphas)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def create_app(captioner: test.Captioner, decode_cfg: DecodeConfig, *, max_bytes: int = MAX_UPLOAD_BYTES):
    """The FastAPI app serving one loaded captioner."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.concurrency import run_in_threadpool

    if captioner.transform is None:
        raise ValueError(f"{captioner.source} reads precomputed features, not photos: it cannot serve a photo page")
    page = PAGE.read_text(encoding="utf-8").replace("{{MAX_MB}}", f"{max_bytes / 2**20:.0f}")
    lock = threading.Lock()
    app = FastAPI(title="captioner", docs_url=None, redoc_url=None, openapi_url=None)

    def work(data: bytes, attention: bool) -> dict:
        image = read_upload(data, max_bytes)
        with lock:
            result = caption_image(captioner, image, decode_cfg)
        alphas, model_input = result.pop("_alphas"), result.pop("_input")
        if attention:
            png = attention_png(model_input, result["words"], alphas, captioner.model_cfg.preprocess)
            result["attention_png"] = base64.b64encode(png).decode("ascii")
        return result

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/api/health")
    def health():
        return {"status": "ok", "model": captioner.source, "device": str(captioner.device)}

    @app.post("/api/caption")
    async def caption(request: Request, attention: bool = False):
        data, size = bytearray(), 0
        # Read to the end even past the limit (keeping nothing): a reply sent before the body is
        # consumed breaks the client's connection, and it would see a network error, not the message.
        async for chunk in request.stream():
            size += len(chunk)
            if size <= max_bytes:
                data += chunk
        if size > max_bytes:
            return JSONResponse({"error": f"the upload is {size / 2**20:.1f} MiB, over the limit of "
                                          f"{max_bytes / 2**20:.0f} MiB"}, 413)
        try:
            return await run_in_threadpool(work, bytes(data), attention)
        except UploadError as exc:
            return JSONResponse({"error": str(exc)}, exc.status)

    return app


def is_local(host: str) -> bool:
    """True when `host` only listens on this machine (loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); ValueError when the address cannot be had."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0-65535)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                         f"(another server there? try --port)") from None


def make_server(app, sock: socket.socket):
    """A uvicorn server for `app`; `server.run(sockets=[sock])` serves until `server.should_exit`."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))


def run_serve(checkpoint, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
              decode_cfg: DecodeConfig | dict | None = None, device: str = "auto",
              max_bytes: int = MAX_UPLOAD_BYTES) -> int:
    """`--mode serve`: load the model once, then serve the page until Ctrl-C; returns 0.

    `decode_cfg`: a DecodeConfig, or the decoding flags typed (dict) over the checkpoint's defaults."""
    sock = bind(host, port)  # first, so a busy port fails before the model loads
    try:
        captioner = test.load_captioner(checkpoint, device)
        app = create_app(captioner, captioner.decode_config(decode_cfg), max_bytes=max_bytes)
    except BaseException:
        sock.close()
        raise
    if not is_local(host):
        logger.warning("listening on %s: anyone who can reach this machine can use the page and API "
                       "(use --host 127.0.0.1 to keep it local)", host)
    print(f"captioning with {captioner.source} on {captioner.device}: open http://{host}:{sock.getsockname()[1]}/")
    make_server(app, sock).run(sockets=[sock])
    return 0
