"""Open the rendered report in headless Chromium: no console errors, no network requests, all sections
visible, and a page a reviewer can read at 1280 px: no horizontal scrolling, and at most MAX_HEIGHT_PX
tall with every <details> closed.

Why the DevTools protocol over `--remote-debugging-pipe`: it reports page-level facts directly
(every request the page makes, every console message and uncaught exception) instead of our
guessing them from log text whose format changes between Chromium releases, and a pipe needs no
TCP port (nothing to collide with, nothing listening on the machine) and no websocket client: the
protocol is NUL-terminated JSON on file descriptors 3 (to the browser) and 4 (from it).
The screenshot is taken separately with `--screenshot`, as a reviewer would.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures_metrics import data_context, write_fixture_project

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ["Verdict", "Accuracy against baselines", "Fairness", "Robustness", "Against the last release",
            "Model card", "Data", "Reproducibility", "Glossary", "Signature"]
VIEWPORT_WIDTH = 1280
MAX_HEIGHT_PX = 12_000
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="install Debian's chromium (apt-get install chromium) to run the browser check"),
]

# fd plumbing: chromium expects the pipe on fds 3/4 exactly; a tiny exec wrapper moves them there.
_WRAPPER = "import os,sys; os.dup2(int(sys.argv[1]),3); os.dup2(int(sys.argv[2]),4); os.execv(sys.argv[3], sys.argv[3:])"


class Cdp:
    """Minimal DevTools client over --remote-debugging-pipe (flattened sessions)."""

    def __init__(self, user_data_dir: Path) -> None:
        to_browser_r, self._to_browser_w = os.pipe()
        self._from_browser_r, from_browser_w = os.pipe()
        cmd = [sys.executable, "-c", _WRAPPER, str(to_browser_r), str(from_browser_w), str(CHROMIUM), *FLAGS,
               f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", f"--window-size={VIEWPORT_WIDTH},900", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from Chromium in time")
            ready, _, _ = select.select([self._from_browser_r], [], [], left)
            if ready:
                chunk = os.read(self._from_browser_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def drain(self, seconds: float) -> None:
        """Collect late events (e.g. a request fired after load) for a moment."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing is best effort; the process is killed below
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser_w)
        os.close(self._from_browser_r)


_VISIBILITY_JS = """
JSON.stringify(Array.from(document.querySelectorAll('h2')).map(h => {
  const r = h.getBoundingClientRect(); const s = getComputedStyle(h);
  return {text: h.textContent.trim(), visible: r.width > 0 && r.height > 0 && s.visibility !== 'hidden'
          && s.display !== 'none' && parseFloat(s.opacity) > 0};
}).concat([{scripts: document.scripts.length, svgs: document.querySelectorAll('svg').length,
            title: document.title}]))
"""


# Every <details> closed (the state a reader first sees), then the document's extent.
_LAYOUT_JS = """
(() => { document.querySelectorAll('details').forEach(d => { d.open = false; });
  const e = document.documentElement;
  return JSON.stringify({viewport: window.innerWidth, scroll_width: e.scrollWidth,
                         height: Math.max(e.scrollHeight, document.body.scrollHeight),
                         details: document.querySelectorAll('details').length}); })()
"""


def open_page(url: str, profile: Path, expressions: list[str]) -> tuple[Cdp, list[Any]]:
    """Load `url` in a fresh headless Chromium and evaluate each expression (JSON text) in order."""
    cdp = Cdp(profile)
    values: list[Any] = []
    try:
        targets = cdp.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session = cdp.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            cdp.call(f"{domain}.enable", session=session)
        cdp.events.clear()
        cdp.call("Page.navigate", {"url": url}, session=session)
        cdp.wait_for("Page.loadEventFired")
        cdp.drain(1.0)
        for expression in expressions:
            result = cdp.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
            values.append(json.loads(result["result"]["value"]))
    finally:
        cdp.close()
    return cdp, values


@pytest.fixture()
def report(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.delenv("METAREC_AUDIT_SIGNING_KEY_FILE", raising=False)
    root = write_fixture_project(tmp_path / "proj", hostile=True)
    from audit.report import build_context, render_report
    from metarec.io import atomic_write_text

    params = yaml.safe_load((root / "params.yaml").read_text())
    html = render_report(build_context(root, params, data=data_context(hostile=True)))
    return atomic_write_text(root / "reports" / "audit.html", html)


def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    url = report.resolve().as_uri()
    cdp, (facts, layout) = open_page(url, tmp_path / "profile", [_VISIBILITY_JS, _LAYOUT_JS])

    requests = [e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(u == url for u in requests), f"the report made network requests: {requests}"
    console_errors = [e["params"] for e in cdp.events
                      if (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
                      or e.get("method") == "Runtime.exceptionThrown"
                      or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    assert not console_errors, f"console errors: {console_errors}"
    headings, page_facts = facts[:-1], facts[-1]
    assert [h["text"] for h in headings] == SECTIONS
    assert all(h["visible"] for h in headings), headings
    assert page_facts["scripts"] == 0  # the hostile strings stayed text
    assert page_facts["svgs"] >= 8
    print(f"report layout at {VIEWPORT_WIDTH} px, details closed: {layout}")  # shown with pytest -s
    assert layout["viewport"] == VIEWPORT_WIDTH, layout
    assert layout["details"] >= 10, layout  # the detail is there, collapsed
    assert layout["scroll_width"] <= layout["viewport"], f"the report scrolls sideways at {VIEWPORT_WIDTH} px: {layout}"
    assert layout["height"] <= MAX_HEIGHT_PX, f"the report is too tall with details collapsed: {layout}"

    shot = tmp_path / "report.png"
    done = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}",
                           "--window-size=1280,2000", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    keep = os.environ.get("METAREC_AUDIT_SCREENSHOT")
    if keep:  # lets a human look at it: METAREC_AUDIT_SCREENSHOT=/tmp/report.png pytest -m browser
        Path(keep).write_bytes(shot.read_bytes())
