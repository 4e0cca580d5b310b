"""Interop: Python peers built on pycrdt sync through the collab server's y-websocket endpoint."""

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from httpx_ws import aconnect_ws
from pycrdt import Doc, Provider, Text
from pycrdt.websocket.websocket import HttpxWebsocket

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("COLLAB_BIN", ROOT / "target" / "debug" / "collab"))
WAIT = 20.0


def first_line(proc, timeout):
    """The first line `proc` prints, or "" if it prints none within `timeout` seconds."""
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


class Server:
    """A real `collab serve` on 127.0.0.1:0 with its own data directory."""

    def __init__(self):
        if not BIN.exists():
            raise RuntimeError(f"server binary {BIN} missing: run `cargo build -p collab-server`")
        self.data = tempfile.mkdtemp(prefix="collab-py-")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data, "--web-dir", "/nonexistent"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = first_line(self.proc, WAIT)
        match = re.search(r"listening on http://(127\.0\.0\.1:\d+)", line)
        if not match:
            self.close()
            raise RuntimeError(f"unexpected first line from the server: {line!r}")
        self.addr = match.group(1)

    def token(self, project, role="editor", user="py"):
        out = subprocess.run(
            [str(BIN), "token", "--data-dir", self.data, "--project", project, "--role", role, "--user", user],
            check=True,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        return out.stdout.strip()

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=WAIT)
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@asynccontextmanager
async def peer(server, doc_name, token):
    doc = Doc()
    doc["content"] = text = Text()
    url = f"ws://{server.addr}/sync/{doc_name}?token={token}"
    async with aconnect_ws(url) as ws:
        async with Provider(doc, HttpxWebsocket(ws, doc_name)) as provider:
            await asyncio.wait_for(provider.synced.wait(), WAIT)
            yield text


async def until(cond, what):
    async def poll():
        while not cond():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), WAIT)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def test_two_pycrdt_peers_converge(server):
    async def run():
        token = server.token("py")
        async with peer(server, "py/notes", token) as a, peer(server, "py/notes", token) as b:
            a.insert(0, "from a;")
            b.insert(0, "from b;")
            await until(lambda: str(a) == str(b) and len(str(a)) == 14, "convergence")
            assert sorted([str(a)[:7], str(a)[7:]]) == ["from a;", "from b;"]
        # A later peer loads what the server kept.
        async with peer(server, "py/notes", token) as late:
            await until(lambda: len(str(late)) == 14, "late joiner state")

    asyncio.run(run())


def test_a_pycrdt_viewer_cannot_write(server):
    async def run():
        editor_token = server.token("py", "editor", "ed")
        viewer_token = server.token("py", "viewer", "vi")
        async with peer(server, "py/ro", editor_token) as ed, peer(server, "py/ro", viewer_token) as vi:
            ed.insert(0, "hello")
            await until(lambda: str(vi) == "hello", "viewer reads")
            vi.insert(0, "EVIL ")
            ed.insert(5, "!")
            await until(lambda: str(vi).endswith("hello!"), "editor edit reaches the viewer")
            assert str(ed) == "hello!"
        async with peer(server, "py/ro", editor_token) as fresh:
            await until(lambda: str(fresh) == "hello!", "stored text without the viewer's edit")

    asyncio.run(run())


def test_a_bad_token_is_refused(server):
    async def run():
        with pytest.raises(Exception) as err:
            async with aconnect_ws(f"ws://{server.addr}/sync/py/x?token=forged"):
                pass
        assert "401" in str(err.value)

    asyncio.run(run())
