"""The web page and JSON API (serve.py): a real server on a free localhost port, an HTTP client, and a
real browser (headless Debian Chromium through selenium)."""
from __future__ import annotations

import base64
import io
import json
import logging
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
from PIL import Image

import checkpoint
import decoding
import export
import helpers_infer as hi
from helpers_browser import console_errors, open_browser
import serve
import test as test_mod
from config import DecodeConfig
from helpers_infer import one_torch_thread  # noqa: F401  (autouse fixture)

MAX_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    return hi.tiny_checkpoint(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def url(tiny_pt, tmp_path_factory):
    """A server for the tiny model, started in this process on a free port; stopped after the module."""
    folder = export.export_model(checkpoint.load_checkpoint(tiny_pt),
                                 tmp_path_factory.mktemp("serve") / "model")
    captioner = test_mod.load_captioner(checkpoint.read_model_folder(folder), "cpu")
    app = serve.create_app(captioner, DecodeConfig(beam_size=3), max_bytes=MAX_BYTES)
    sock = serve.bind("127.0.0.1", 0)
    server = serve.make_server(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start within 30 s"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _post(url: str, data: bytes, query: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/caption{query}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header for side x side pixels with no pixel data: a decompression bomb's shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_the_page_is_served_and_loads_nothing_from_elsewhere(url):
    with urllib.request.urlopen(url + "/", timeout=30) as response:
        page = response.read().decode()
    assert '<input id="file" type="file"' in page and "1 MiB" in page
    assert "http://" not in page and "https://" not in page  # no CDN, fonts or analytics
    with urllib.request.urlopen(url + "/api/health", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"


@pytest.mark.parametrize("kind", ["red", "blue"])
def test_the_api_captions_a_photo_with_scores(url, kind):
    status, result = _post(url, _png(hi.photo(kind, 11)))
    assert status == 200, result
    assert result["caption"] == hi.KINDS[kind][1]
    assert result["words"] == result["caption"].split()
    scores = [c["score"] for c in result["candidates"]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    assert result["candidates"][0] == {"caption": result["caption"], "score": result["score"]}
    assert len({c["caption"] for c in result["candidates"]}) == len(result["candidates"]) > 1
    assert "attention_png" not in result


def test_the_candidates_are_the_beams_own_best_few(tiny_pt):
    captioner = test_mod.load_captioner(tiny_pt, "cpu")
    image = hi.photo("blue", 13)
    cfg = DecodeConfig(beam_size=4)
    result = serve.caption_image(captioner, image, cfg)
    vocab = captioner.vocab
    out = decoding.beam_search(captioner.model, captioner.transform(image).unsqueeze(0), cfg=cfg, n_best=4,
                               sos_id=vocab.sos_id, eos_id=vocab.eos_id, unk_id=vocab.unk_id)
    expected = [{"caption": " ".join(vocab.decode(t)), "score": round(s, 4)} for t, s in zip(out.tokens, out.scores)]
    assert result["candidates"] == expected and len({c["caption"] for c in expected}) == 4
    assert result["caption"] == expected[0]["caption"] and result["beam_size"] == 4


def test_the_api_draws_the_attention_panels_on_request(url):
    status, result = _post(url, _png(hi.photo("red", 12)), "?attention=1")
    assert status == 200, result
    figure = Image.open(io.BytesIO(base64.b64decode(result["attention_png"])))
    assert figure.format == "PNG" and figure.width > 300


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    hi.photo("red", 1, size=200).save(buf, format="JPEG")
    return buf.getvalue()[:600]


@pytest.mark.parametrize("data, status, message", [
    (b"", 400, "the upload is empty"),
    (b"just some text, not a photo", 400, "not a readable image"),
    (_truncated_jpeg(), 400, "not a readable image"),
    (_bomb_png(), 413, "decompression bomb"),
    (b"\0" * (MAX_BYTES + 1), 413, "over the limit of 1 MiB"),
])
def test_bad_uploads_get_a_4xx_and_the_server_keeps_serving(url, data, status, message):
    got, result = _post(url, data)
    assert got == status and message in result["error"], result
    assert "\n" not in result["error"] and "/tmp" not in result["error"]
    assert _post(url, _png(hi.photo("blue", 3)))[0] == 200


def test_addresses_beyond_localhost_are_warned_about(tiny_pt, monkeypatch, caplog):
    assert serve.is_local("127.0.0.1") and serve.is_local("localhost") and serve.is_local("::1")
    assert not serve.is_local("0.0.0.0") and not serve.is_local("192.168.1.5")
    ran = []
    # Bind to loopback whatever the host asked: the test checks the warning, not the network.
    monkeypatch.setattr(serve, "bind", lambda host, port: serve.socket.create_server(("127.0.0.1", 0)))
    monkeypatch.setattr(serve, "make_server", lambda app, sock: type("S", (), {"run": lambda self, sockets: ran.append(1)})())
    with caplog.at_level(logging.WARNING, logger="serve"):
        assert serve.run_serve(str(tiny_pt), host="0.0.0.0", port=7860, device="cpu") == 0
    assert ran and "anyone who can reach this machine" in caplog.text


def test_a_busy_port_and_a_bad_port_are_one_line_errors():
    sock = serve.bind("127.0.0.1", 0)
    try:
        with pytest.raises(ValueError, match="cannot listen on 127.0.0.1"):
            serve.bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
    with pytest.raises(ValueError, match="not a TCP port"):
        serve.bind("127.0.0.1", 70000)


def test_a_features_model_cannot_serve_photos(tmp_path_factory):
    pt = hi.features_checkpoint(tmp_path_factory.getbasetemp())
    with pytest.raises(ValueError, match="features"):
        serve.run_serve(str(pt), port=0, device="cpu")


# ------------------------------------------------------------------------ a real browser

def caption_in_browser(driver, url: str, photo: Path, timeout: float = 60) -> str:
    """Choose `photo` on the page; returns the caption (or the error) the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "caption").text or d.find_element(By.ID, "error").text)
    return driver.find_element(By.ID, "caption").text or driver.find_element(By.ID, "error").text


def test_a_browser_captions_a_photo_and_shows_the_attention_panels(url, tmp_path):
    from selenium.webdriver.common.by import By

    photo = hi.make_photo(tmp_path / "red.jpg", "red", 21, size=160)
    not_photo = tmp_path / "notes.jpg"
    not_photo.write_text("not a photo")
    driver = open_browser(tmp_path / "profile")
    try:
        assert caption_in_browser(driver, url, photo) == hi.KINDS["red"][1]
        assert console_errors(driver) == []  # not even a favicon 404
        rows = driver.find_elements(By.CSS_SELECTOR, "#candidates tr")
        assert len(rows) >= 2 and hi.KINDS["red"][1] in rows[1].text  # header + best first
        panels = driver.find_element(By.ID, "attention")
        assert panels.is_displayed()
        width = driver.execute_script("return arguments[0].naturalWidth", panels)
        assert width > 300, "the attention figure did not load"
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 500
        message = caption_in_browser(driver, url, not_photo)
        assert "not a readable image" in message
        assert not driver.find_element(By.ID, "attention").is_displayed()
    finally:
        driver.quit()
