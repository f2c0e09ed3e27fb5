"""End-to-end tests of the dashboard (`GET /`, static/dashboard.html) in headless Chromium.

Chromium is driven over the Chrome DevTools Protocol with `simple_websocket` (no extra Python
package): Runtime.evaluate reads the DOM and clicks, Input.insertText types, console messages and
uncaught exceptions are collected, Page.captureScreenshot writes docs/dashboard.png. Every wait is
a poll with a deadline; nothing sleeps to synchronise. Needs Debian's `chromium` package.
"""

import base64
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
import simple_websocket

from conftest import ROOT, wait_for

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "dashboard.png"
TIMEOUT = 10.0

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} not found: install it with `apt-get install -y chromium` (CI installs it)",
)


class Browser:
    """One headless Chromium and a CDP session on its page target."""

    def __init__(self, profile: Path):
        self.profile = profile
        self.log_path = profile.parent / "chromium.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.log_file, start_new_session=True)
        port = wait_for(self._devtools_port, timeout=30, message=f"Chromium DevTools port (log: {self.log_path})")
        page = wait_for(lambda: self._page_target(port), timeout=10, message="a Chromium page target")
        self.ws = simple_websocket.Client.connect(page["webSocketDebuggerUrl"])
        self.ids = itertools.count(1)
        self.errors = []      # console errors and uncaught exceptions, as text
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)

    def _devtools_port(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"Chromium exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
        try:
            first = (self.profile / "DevToolsActivePort").read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            return None
        return int(first) if first.isdigit() else None

    @staticmethod
    def _page_target(port):
        try:
            targets = requests.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
        except (requests.RequestException, ValueError):
            return None
        return next((t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")), None)

    # -- protocol ------------------------------------------------------------------------------

    def call(self, method, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            raw = self.ws.receive(timeout=TIMEOUT)
            if raw is None:
                raise AssertionError(f"no answer from Chromium to {method} within {TIMEOUT}s")
            msg = json.loads(raw)
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise AssertionError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg):
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console." + params["type"] + ": " +
                               " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())

    def js(self, expression):
        """Evaluate in the page and return the value; a page-side exception fails the test."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page error in {expression!r}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def pump(self):
        """Process events received so far (errors are collected as they come)."""
        self.js("1")

    # -- page helpers --------------------------------------------------------------------------

    def open(self, url):
        self.call("Page.navigate", url="about:blank")
        self.errors.clear()
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.js("document.readyState") == "complete" and self.js("location.href") == url,
                 timeout=TIMEOUT, message=f"{url} to load")

    def text(self, selector):
        return self.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent")

    def state(self):
        return self.js("document.getElementById('conn-state').dataset.state")

    def wait_live(self, timeout=TIMEOUT):
        wait_for(lambda: self.state() == "live", timeout=timeout, interval=0.05,
                 message=f"the page to show live (it shows {self.text('#conn-state')!r})")

    def type_into(self, selector, text):
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.call("Input.insertText", text=text)

    def click(self, selector):
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def open_wallet(self, user_id):
        self.type_into("#wallet-user", user_id)
        self.click("#wallet-open")
        wait_for(lambda: self.text("#wallet-current") == user_id and self.state() == "live", timeout=TIMEOUT,
                 interval=0.05, message=f"the wallet of {user_id} to open")

    def visible(self, selector):
        return self.js(f"document.querySelector({json.dumps(selector)}).getClientRects().length > 0")

    def storage(self):
        """Every value the page's origin keeps in sessionStorage and localStorage."""
        return self.js("""(() => {
            const all = (s) => Object.fromEntries(
                Array.from({length: s.length}, (_, i) => [s.key(i), s.getItem(s.key(i))]));
            return {session: all(sessionStorage), local: all(localStorage)};
        })()""")

    def open_sockets(self):
        """How many WebSockets of the page are connecting or open (DevTools' queryObjects)."""
        proto = self.call("Runtime.evaluate", expression="WebSocket.prototype")["result"]["objectId"]
        found = self.call("Runtime.queryObjects", prototypeObjectId=proto)["objects"]["objectId"]
        return self.call("Runtime.callFunctionOn", objectId=found, returnByValue=True, functionDeclaration=
                         "function () { return this.filter((ws) => ws.readyState <= WebSocket.OPEN).length; }"
                         )["result"]["value"]

    def balance_cents(self):
        return self.js("document.getElementById('balance').dataset.cents")

    def board(self):
        return self.js("""Array.from(document.querySelectorAll('#leaderboard tbody tr[data-user]')).map(tr => [
            Number(tr.dataset.rank), tr.dataset.user, tr.querySelector('[data-cents]').dataset.cents])""")

    def feed(self):
        return self.js("""Array.from(document.querySelectorAll('#feed li.outcome')).map(li => [
            li.dataset.outcomeId, li.dataset.result, li.textContent])""")

    def screenshot(self, path):
        wait_for(lambda: self.js("document.getAnimations().every(a => a.playState !== 'running')"),
                 timeout=TIMEOUT, interval=0.05, message="highlight animations to end")
        # A fixed 1280x800 viewport, whatever the window decorations take, so the page fits without scrolling.
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1, mobile=False)
        try:
            data = self.call("Page.captureScreenshot", format="png")["data"]
        finally:
            self.call("Emulation.clearDeviceMetricsOverride")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:  # noqa: BLE001 - it may already be gone; the kill below is what counts
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:
            self.ws.close()
        except simple_websocket.ConnectionClosed:
            pass  # Browser.close ended the session first
        self.log_file.close()


@pytest.fixture(scope="module")
def browser():
    tmp = Path(tempfile.mkdtemp(prefix="dashboard-chromium-"))
    b = Browser(tmp / "profile")
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(tmp, ignore_errors=True)


def post(srv, path, body, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = requests.post(srv.url + path, json=body, headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def settle(srv, user_id, game, bet, payout, key=None):
    return post(srv, "/api/games/outcomes", {"user_id": user_id, "game": game, "bet": bet, "payout": payout}, key)


# -- tests -----------------------------------------------------------------------------------------


def test_page_loads_live_without_console_errors(browser, start_server):
    srv = start_server()
    response = requests.get(srv.url + "/", timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    # Self-contained, and data only ever reaches the DOM as text.
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", response.text)
    assert "innerHTML" not in response.text and "insertAdjacentHTML" not in response.text
    browser.open(srv.url + "/")
    browser.wait_live()
    wait_for(lambda: browser.text("#leaderboard tbody") == "No games played yet", timeout=TIMEOUT,
             message="the empty leaderboard")
    assert browser.js("document.title").startswith("Wallet")
    # Authentication is off: no key form, no sign-out, nothing stored.
    assert not browser.visible("#auth-card") and not browser.visible("#signout-btn")
    assert browser.storage()["session"] == {}
    browser.pump()
    assert browser.errors == []

    # Phone width: one column, nothing wider than the screen.
    browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
    try:
        layout = browser.js("""(() => {
            const [a, b, c] = ['board-card', 'feed-card', 'wallet-card']
                .map((id) => document.getElementById(id).getBoundingClientRect());
            return {overflow: document.documentElement.scrollWidth - window.innerWidth,
                    stacked: a.left === b.left && b.left === c.left && a.bottom <= b.top && b.bottom <= c.top};
        })()""")
    finally:
        browser.call("Emulation.clearDeviceMetricsOverride")
    assert layout == {"overflow": 0, "stacked": True}


def test_outcome_appears_in_feed_and_moves_leaderboard(browser, start_server):
    srv = start_server()
    players = {"alice": 5000, "bob": 4000, "carol": 3000, "dave": 6000, "erin": 2500, "frank": 8000,
               "grace": 4500, "heidi": 3500}
    for user_id, amount in players.items():
        post(srv, "/api/wallet/deposit", {"user_id": user_id, "amount": amount})
    settle(srv, "alice", "slots", 500, 1750)
    settle(srv, "bob", "roulette", 1000, 0)
    browser.open(srv.url + "/")
    browser.wait_live()
    wait_for(lambda: browser.board() == [[1, "alice", "1250"], [2, "bob", "-1000"]], timeout=TIMEOUT,
             message="the leaderboard loaded over HTTP")

    rounds = [("carol", "blackjack", 200, 400), ("dave", "slots", 1000, 0), ("erin", "poker", 300, 1200),
              ("frank", "roulette", 2500, 5000), ("grace", "slots", 100, 100), ("heidi", "dice", 400, 0),
              ("bob", "blackjack", 1000, 2300), ("dave", "crash", 500, 2600), ("alice", "slots", 250, 0),
              ("carol", "roulette", 700, 0)]
    outcomes = [settle(srv, *r) for r in rounds]
    wait_for(lambda: [o[0] for o in browser.feed()] == [o["outcome_id"] for o in reversed(outcomes)],
             timeout=TIMEOUT, interval=0.05, message="the new outcomes, newest first, in the feed")
    expected = [[e["rank"], e["user_id"], str(e["net_winnings"])]
                for e in requests.get(srv.url + "/api/leaderboard", timeout=5).json()["leaderboard"]]
    wait_for(lambda: browser.board() == expected, timeout=TIMEOUT, message=f"the leaderboard {expected}")

    # Wins and losses differ in text, not only in colour.
    feed = {o[0]: o for o in browser.feed()}
    win, loss, even = outcomes[3], outcomes[5], outcomes[4]
    assert feed[win["outcome_id"]][1] == "win" and "▲ WIN" in feed[win["outcome_id"]][2]
    assert "+25.00" in feed[win["outcome_id"]][2]
    assert feed[loss["outcome_id"]][1] == "loss" and "▼ LOSS" in feed[loss["outcome_id"]][2]
    assert "\u22124.00" in feed[loss["outcome_id"]][2]
    assert feed[even["outcome_id"]][1] == "even"

    # One more outcome moves heidi from the bottom to the top, and her row is highlighted.
    outcome = settle(srv, "heidi", "dice", 100, 10000)
    wait_for(lambda: browser.feed()[0][0] == outcome["outcome_id"], timeout=TIMEOUT, message="heidi's win in the feed")
    wait_for(lambda: browser.board()[0] == [1, "heidi", "9500"], timeout=TIMEOUT, message="heidi at rank 1")
    assert browser.js("document.querySelector('#leaderboard tr[data-user=heidi]').classList.contains('flash')")
    assert "▲" in browser.text("#leaderboard tr[data-user=heidi] .move")

    # A user's own wallet in the panel, for the screenshot.
    browser.open_wallet("frank")
    wait_for(lambda: browser.js("document.querySelectorAll('#transactions tbody tr[data-transaction-id]').length") == 3,
             timeout=TIMEOUT, message="frank's transactions")
    browser.type_into("#deposit-amount", "25.00")
    wait_for(lambda: browser.text("#deposit-hint") == "= 25.00 (2500 cents)", timeout=TIMEOUT, message="the hint")
    browser.pump()
    assert browser.errors == []
    browser.screenshot(SCREENSHOT)


def test_deposit_through_the_page_updates_balance(browser, start_server, uid):
    srv = start_server()
    browser.open(srv.url + "/")
    browser.open_wallet(uid)
    wait_for(lambda: browser.balance_cents() == "0", timeout=TIMEOUT, message="balance 0")

    browser.type_into("#deposit-amount", "12.34")
    browser.click("#deposit-btn")
    wait_for(lambda: browser.balance_cents() == "1234", timeout=TIMEOUT, message="balance 1234 after the deposit")
    assert browser.text("#balance") == "12.34"
    assert requests.get(f"{srv.url}/api/wallet/balance/{uid}", timeout=5).json()["balance"] == 1234

    browser.type_into("#deposit-amount", "66")  # no decimal point: cents
    browser.click("#deposit-btn")
    wait_for(lambda: browser.balance_cents() == "1300", timeout=TIMEOUT, message="balance 1300")

    # A change made elsewhere arrives live through the balance event, with the transactions list.
    post(srv, "/api/wallet/withdraw", {"user_id": uid, "amount": 300})
    wait_for(lambda: browser.balance_cents() == "1000", timeout=TIMEOUT, message="balance 1000 after the withdrawal")
    wait_for(lambda: browser.js(
        "Array.from(document.querySelectorAll('#transactions tbody tr')).map(tr => tr.children[1].textContent)"
    ) == ["withdraw", "deposit", "deposit"], timeout=TIMEOUT, message="three transactions, newest first")
    assert browser.text("#wallet-error") == ""
    browser.pump()
    assert browser.errors == []


def test_refused_withdrawal_shows_the_api_message(browser, start_server, uid):
    srv = start_server()
    post(srv, "/api/wallet/deposit", {"user_id": uid, "amount": 500})
    browser.open(srv.url + "/")
    browser.open_wallet(uid)
    wait_for(lambda: browser.balance_cents() == "500", timeout=TIMEOUT, message="balance 500")

    browser.type_into("#withdraw-amount", "10.00")
    browser.click("#withdraw-btn")
    wait_for(lambda: "not enough money" in browser.text("#wallet-error"), timeout=TIMEOUT,
             message="the API's error message")
    assert browser.balance_cents() == "500"
    assert requests.get(f"{srv.url}/api/wallet/balance/{uid}", timeout=5).json()["balance"] == 500

    # Input the API would refuse is explained before anything is sent.
    browser.type_into("#withdraw-amount", "1.234")
    browser.click("#withdraw-btn")
    wait_for(lambda: "decimal point" in browser.text("#wallet-error"), timeout=TIMEOUT, message="the input error")
    browser.pump()
    # The 409 itself shows up as a network log line; the page's own code must stay quiet.
    assert [e for e in browser.errors if not e.startswith("log (network)")] == []


def test_page_reconnects_after_server_restart(browser, start_server, uid):
    srv = start_server()
    post(srv, "/api/wallet/deposit", {"user_id": uid, "amount": 4200})
    settle(srv, uid, "slots", 200, 0)
    browser.open(srv.url + "/")
    browser.open_wallet(uid)
    wait_for(lambda: browser.balance_cents() == "4000" and browser.board() == [[1, uid, "-200"]],
             timeout=TIMEOUT, message="balance and board before the restart")

    port = srv.http_port
    assert srv.stop() == 0
    wait_for(lambda: browser.state() == "reconnecting", timeout=TIMEOUT, interval=0.05, message="reconnecting")
    assert browser.text("#conn-state").startswith("Reconnecting")

    # A later --http-port wins over the fixture's `--http-port 0`: the same address comes back.
    restarted = start_server("--http-port", str(port))
    assert restarted.http_port == port
    # A new process is a new epoch: the page cannot recover and says it re-read everything.
    wait_for(lambda: browser.text("#conn-state") == "Live · re-synced", timeout=15, interval=0.05,
             message="re-synced after the restart")  # backoff is capped at 5 s
    browser.wait_live()
    # The new process has an empty store: the reload after reconnecting shows it.
    wait_for(lambda: browser.balance_cents() == "0" and browser.board() == [], timeout=TIMEOUT,
             message="balance and board reloaded from the restarted server")

    # Both subscriptions are live again.
    post(restarted, "/api/wallet/deposit", {"user_id": uid, "amount": 1000})
    outcome = settle(restarted, uid, "dice", 100, 350)
    wait_for(lambda: browser.balance_cents() == "1250", timeout=TIMEOUT, message="a live balance after the restart")
    wait_for(lambda: browser.feed() and browser.feed()[0][0] == outcome["outcome_id"], timeout=TIMEOUT,
             message="a live outcome after the restart")
    wait_for(lambda: browser.board() == [[1, uid, "250"]], timeout=TIMEOUT, message="a live board after the restart")
    browser.pump()
    # Refused connection attempts while the server was down are logged by Chromium itself (network
    # errors); the page's own code must not have thrown or logged anything.
    own = [e for e in browser.errors
           if not e.startswith("log (network)") and "WebSocket connection to" not in e]
    assert own == []


def drop_websockets(browser):
    """Close every WebSocket of the page from outside its code (DevTools' queryObjects)."""
    proto = browser.call("Runtime.evaluate", expression="WebSocket.prototype")["result"]["objectId"]
    found = browser.call("Runtime.queryObjects", prototypeObjectId=proto)["objects"]["objectId"]
    browser.call("Runtime.callFunctionOn", objectId=found, returnByValue=True,
                 functionDeclaration="function () { this.forEach((ws) => ws.close()); return this.length; }")


def test_page_recovers_missed_events_after_a_reconnect(browser, start_server, uid):
    srv = start_server()
    post(srv, "/api/wallet/deposit", {"user_id": uid, "amount": 1000})
    browser.open(srv.url + "/")
    browser.open_wallet(uid)
    first = settle(srv, uid, "slots", 100, 0)
    wait_for(lambda: browser.feed() and browser.feed()[0][0] == first["outcome_id"]
             and browser.balance_cents() == "900", timeout=TIMEOUT, message="the first outcome, live")

    # Cut the page off: its sockets close and every reconnect attempt fails until unblocked.
    browser.call("Network.enable")
    browser.call("Network.setBlockedURLs", urls=[f"ws://127.0.0.1:{srv.http_port}/ws*"])
    drop_websockets(browser)
    wait_for(lambda: browser.state() == "reconnecting", timeout=TIMEOUT, interval=0.05, message="reconnecting")
    missed = [settle(srv, uid, "dice", 50, 200), settle(srv, uid, "crash", 25, 0)]
    deposit = post(srv, "/api/wallet/deposit", {"user_id": uid, "amount": 5})
    browser.call("Network.setBlockedURLs", urls=[])
    browser.js("document.getElementById('retry-btn').click()")

    browser.wait_live(timeout=15)
    # The missed outcomes came back over the socket (HTTP has no feed), in order, without a gap notice.
    wait_for(lambda: [o[0] for o in browser.feed()[:3]] == [missed[1]["outcome_id"], missed[0]["outcome_id"],
                                                          first["outcome_id"]],
             timeout=TIMEOUT, message="the missed outcomes in the feed")
    assert browser.js("document.querySelectorAll('#feed li.gap').length") == 0
    assert browser.js("document.getElementById('conn-state').dataset.resynced") == "false"
    wait_for(lambda: browser.balance_cents() == str(deposit["balance"]), timeout=TIMEOUT, message="the balance")
    assert deposit["balance"] == 900 - 50 + 200 - 25 + 5
    expected = [[1, uid, str(-100 + 150 - 25)]]
    wait_for(lambda: browser.board() == expected, timeout=TIMEOUT, message="the board brought up to date")

    # Live again on both sockets.
    last = settle(srv, uid, "slots", 0, 10)
    wait_for(lambda: browser.feed()[0][0] == last["outcome_id"], timeout=TIMEOUT, message="a live outcome")
    browser.call("Network.disable")
    browser.pump()
    own = [e for e in browser.errors if not e.startswith("log (network)") and "WebSocket connection to" not in e]
    assert own == []


# -- authentication on (CONTRACT.md 8) -------------------------------------------------------------

KEY_ITEM = "wallet.operatorKey"


def sign_in(browser, key):
    browser.type_into("#auth-key", key)
    browser.click("#auth-submit")


def wait_for_key_form(browser):
    wait_for(lambda: browser.visible("#auth-card") and browser.state() == "signed-out", timeout=TIMEOUT,
             interval=0.05, message=f"the key form (status {browser.text('#conn-state')!r})")
    assert not browser.visible("main") and not browser.visible("#signout-btn")


def own_errors(browser):
    """Errors of the page's own code; Chromium logs every 401 and refused connection itself."""
    browser.pump()
    return [e for e in browser.errors if not e.startswith("log (network)") and "WebSocket connection to" not in e]


def test_auth_on_the_page_asks_for_an_operator_key(browser, start_server, uid):
    key = secrets.token_urlsafe(32)
    srv = start_server(env={"API_KEYS": key})
    post(srv, "/api/wallet/deposit", {"user_id": uid, "amount": 3000}, key)
    settle(srv, uid, "slots", 500, 2000, key)
    url = srv.url + "/"
    browser.open(url)
    wait_for_key_form(browser)
    assert "Operator key needed" in browser.text("#conn-state")

    # Not the shape of a key: explained without asking the server.
    sign_in(browser, "too-short")
    wait_for(lambda: "32 to 256" in browser.text("#auth-error"), timeout=TIMEOUT, message="the format error")
    # A well-formed key the service does not know: refused, and the page keeps asking.
    wrong = secrets.token_urlsafe(32)
    sign_in(browser, wrong)
    wait_for(lambda: "not accepted" in browser.text("#auth-error"), timeout=TIMEOUT, message="the wrong key refused")
    wait_for_key_form(browser)
    assert browser.storage() == {"session": {}, "local": {}}

    # The right key: the leaderboard over HTTP and the event stream over the WebSocket.
    sign_in(browser, key)
    browser.wait_live()
    assert not browser.visible("#auth-card") and browser.visible("#signout-btn")
    wait_for(lambda: browser.board() == [[1, uid, "1500"]], timeout=TIMEOUT, message="the leaderboard with the key")
    outcome = settle(srv, uid, "dice", 100, 400, key)
    wait_for(lambda: browser.feed() and browser.feed()[0][0] == outcome["outcome_id"], timeout=TIMEOUT,
             message="a live outcome over the authenticated WebSocket")
    wait_for(lambda: browser.board() == [[1, uid, "1800"]], timeout=TIMEOUT, message="a live leaderboard")

    # Kept for the browser session only, never in the page's URL or left in the form.
    stored = browser.storage()
    assert stored["session"] == {KEY_ITEM: key}
    assert key not in json.dumps(stored["local"])
    assert browser.js("location.href") == url and key not in browser.js("location.href + document.referrer")
    assert browser.js("document.getElementById('auth-key').value") == ""

    # The wallet panel works with the key too: a write, and its balance event.
    browser.open_wallet(uid)
    wait_for(lambda: browser.balance_cents() == "4800", timeout=TIMEOUT, message="the balance with the key")
    browser.type_into("#deposit-amount", "200")
    browser.click("#deposit-btn")
    wait_for(lambda: browser.balance_cents() == "5000", timeout=TIMEOUT, message="the deposit through the page")
    assert browser.text("#wallet-error") == ""

    # A reload in the same tab keeps the key: no prompt.
    browser.open(url)
    browser.wait_live()
    assert not browser.visible("#auth-card")
    wait_for(lambda: browser.board() == [[1, uid, "1800"]], timeout=TIMEOUT, message="the board after a reload")

    # Sign out forgets the key, hides what it showed, closes the sockets and asks again.
    browser.click("#signout-btn")
    wait_for_key_form(browser)
    assert browser.storage()["session"] == {}
    assert browser.board() == [] and browser.feed() == []
    wait_for(lambda: browser.open_sockets() == 0, timeout=TIMEOUT, message="the WebSockets closed")
    # And the page starts over with a new key, as on a first visit.
    sign_in(browser, key)
    browser.wait_live()
    wait_for(lambda: browser.board() == [[1, uid, "1800"]] and browser.balance_cents() == "5000",
             timeout=TIMEOUT, message="board and balance after signing in again")

    assert own_errors(browser) == []
    assert not any(key in e for e in browser.errors), "the key reached the browser's console"
    assert key not in srv.log()


def test_auth_a_key_the_websocket_refuses_is_forgotten(browser, start_server, uid):
    # The service restarts with another key: the page's reconnect is refused `unauthorized` + 1008,
    # it drops the stale key and asks for one, without retrying in a loop.
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    srv = start_server(env={"API_KEYS": old})
    browser.open(srv.url + "/")
    wait_for_key_form(browser)
    sign_in(browser, old)
    browser.wait_live()
    assert browser.storage()["session"] == {KEY_ITEM: old}

    port = srv.http_port
    assert srv.stop() == 0
    wait_for(lambda: browser.state() == "reconnecting", timeout=TIMEOUT, interval=0.05, message="reconnecting")
    restarted = start_server("--http-port", str(port), env={"API_KEYS": new})
    wait_for_key_form(browser)
    assert "no longer accepted" in browser.text("#auth-note")
    assert browser.storage()["session"] == {}
    wait_for(lambda: browser.open_sockets() == 0, timeout=TIMEOUT, message="no WebSocket retrying")

    sign_in(browser, new)
    browser.wait_live()
    outcome = settle(restarted, uid, "slots", 0, 10, new)
    wait_for(lambda: browser.feed() and browser.feed()[0][0] == outcome["outcome_id"], timeout=TIMEOUT,
             message="a live outcome with the new key")
    assert browser.storage()["session"] == {KEY_ITEM: new}
    assert own_errors(browser) == []
    # While the server was down the page did not hand the key to a WebSocket that Chromium would log
    # as failed (its URL holds the `token`).
    assert not any(old in e or new in e for e in browser.errors), "a key reached the browser's console"
