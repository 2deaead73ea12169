"""`llavakit web` end to end in headless Chromium: upload an image, ask, see the reply appear.

The server runs as a real subprocess bound to 127.0.0.1 on a free port and is stopped by the test.
The browser may talk to that server only (every other request is aborted and reported), so the
test needs no network. Skipped, with the install command, when Gradio, Playwright or a Chromium
binary is missing. Set ``LLAVAKIT_CHROMIUM`` to use a browser other than /usr/bin/chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

MAX_NEW = 10
HANG_GUARD_S = 300  # fail instead of hanging; nothing asserts on time
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"]


def _chromium() -> str | None:
    for cand in (os.environ.get("LLAVAKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("gradio", reason="gradio is not installed: pip install 'llavakit[web]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium binary: apt-get install chromium (or set LLAVAKIT_CHROMIUM=/path/to/chrome)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (Linux /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if int(p, 16) == port and state == "0A":  # 0A = LISTEN
                    if len(addr) == 8:  # IPv4, little-endian hex
                        found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                    else:
                        found.add("ipv6:" + addr)
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("web_images")
    Image.new("RGB", (40, 30), (220, 20, 20)).save(d / "red.png")
    Image.new("RGB", (120, 120), (20, 20, 220)).save(d / "huge.png")  # over the server's --max-pixels
    noise = np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "noisy.png")  # few pixels, but a file over the server's --max-file-size
    assert (d / "noisy.png").stat().st_size > 12_000 and (d / "red.png").stat().st_size < 2_000
    return d


@pytest.fixture(scope="module")
def server(tiny_built, tmp_path_factory):
    model, processor = tiny_built
    model_dir = tmp_path_factory.mktemp("web_model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio_tmp")))
    log = open(model_dir / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "llavakit.cli", "web", "--model", str(model_dir),
                             "--port", str(port), "--max-new-tokens", str(MAX_NEW), "--device", "cpu",
                             "--max-pixels", "10000", "--max-file-size", "10kb"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"llavakit web exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"llavakit web did not come up:\n{log.read()}")
            time.sleep(1)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _expected_replies(tiny_built, image_path):
    from llavakit.data.images import open_image
    from llavakit.infer.generate import ChatSession, GenerationSettings, Generator

    s = ChatSession(Generator(*tiny_built), GenerationSettings(max_new_tokens=MAX_NEW))
    s.add_image(open_image(image_path))
    return "".join(s.ask("What is in the image?")), "".join(s.ask("And the colour?"))


def _alnum(text: str) -> str:
    # Markdown rendering may change spacing and symbols of gibberish, never letters or digits.
    return re.sub(r"[^0-9A-Za-z]", "", text)


def test_without_gradio_the_command_says_how_to_install(monkeypatch, capsys):
    import argparse

    from llavakit.infer import web

    monkeypatch.setitem(sys.modules, "gradio", None)  # "import gradio" now raises ImportError
    parser = argparse.ArgumentParser()
    web.add_arguments(parser)
    args = parser.parse_args(["--model", "unused"])
    assert args.host == "127.0.0.1"
    assert web.run(args) == 2
    assert "pip install 'llavakit[web]'" in capsys.readouterr().err


def test_loopback_detection():
    from llavakit.infer.web import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5") and not _is_loopback("example.org")


@pytest.mark.slow
def test_server_binds_loopback_only(server):
    _, port = server
    addresses = _listening_addresses(port)
    if not addresses:
        pytest.skip("cannot read /proc/net/tcp on this system")
    assert addresses == {"127.0.0.1"}


@pytest.mark.slow
def test_upload_ask_and_see_the_answer(server, browser, images, tiny_built):
    url, _ = server
    first, second = _expected_replies(tiny_built, images / "red.png")
    page = browser.new_page()
    outside: list[str] = []

    def only_localhost(route):
        if route.request.url.startswith(url.rstrip("/")):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", only_localhost)
    page.set_default_timeout(HANG_GUARD_S * 1000)
    page.goto(url)
    box = page.locator("#ask textarea")
    box.wait_for()

    page.locator("#ask input[type=file]").set_input_files(str(images / "red.png"))
    page.locator("#ask img").first.wait_for()  # the upload preview: the file reached the server
    box.fill("What is in the image?")
    box.press("Enter")
    page.locator('#chat [data-testid="user"] img').first.wait_for()  # the image shows in the conversation
    bot = page.locator('#chat [data-testid="bot"]')
    bot.first.wait_for()
    page.wait_for_function("() => !document.querySelector('#ask textarea').disabled")  # reply finished
    assert _alnum(bot.nth(0).inner_text()) == _alnum(first)
    assert _alnum(first), "the tiny model's reply has no letters; the comparison would prove nothing"

    # a second turn without a new image continues the same conversation
    box.fill("And the colour?")
    box.press("Enter")
    bot.nth(1).wait_for()
    page.wait_for_function("() => !document.querySelector('#ask textarea').disabled")
    assert _alnum(bot.nth(1).inner_text()) == _alnum(second)

    # an image over --max-pixels is refused with a message, and nothing is added to the chat
    page.locator("#ask input[type=file]").set_input_files(str(images / "huge.png"))
    page.locator("#ask img").first.wait_for()
    box.fill("What about this one?")
    box.press("Enter")
    page.get_by_text(re.compile("image too large")).first.wait_for()
    assert bot.count() == 2

    # a file over --max-file-size is refused by the server on upload
    page.locator("#ask input[type=file]").set_input_files(str(images / "noisy.png"))
    page.get_by_text(re.compile("exceed the maximum allowed size")).first.wait_for()

    # Clear empties the conversation
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length === 0")
    assert outside == [], f"the page tried to reach other hosts: {outside}"
    page.close()
