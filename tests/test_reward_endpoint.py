"""PPO's `reward.url` client against a real HTTP server on loopback: a deadline for the whole request,
a cap on the reply, strict scores, retries with back-off on transient failures, and an auth header."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf.config import RewardConfig
from rlhf.judge import HTTPJudge, RewardEndpointError, make_reward_fn

pytestmark = pytest.mark.timeout(60)


class Scorer(BaseHTTPRequestHandler):
    """Behaves as ``self.server.plan`` says, one entry per request (the last one repeats)."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.seen.append({"auth": self.headers.get("Authorization"), "n": len(body["responses"])})
        kind = server.plan[min(len(server.seen), len(server.plan)) - 1]
        if kind == "drip":  # a valid reply, one byte every 0.2 s
            self.send_response(200)
            self.end_headers()
            for byte in json.dumps({"scores": [1.0] * len(body["responses"])}).encode():
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        status, reply = {
            "ok": (200, {"scores": [float(len(r)) for r in body["responses"]]}),
            "503": (503, {"error": "busy"}),
            "400": (400, {"error": "bad"}),
            "string": (200, {"scores": "12"}),
            "bools": (200, {"scores": [True, False]}),
            "nan": (200, {"scores": [float("nan"), 1.0]}),
            "short": (200, {"scores": [1.0]}),
            "huge": (200, {"scores": [1.0, 2.0], "pad": "x" * 3_000_000}),
        }[kind]
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scorer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scorer)
    server.plan, server.seen = ["ok"], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/score"


PROMPTS, RESPONSES = ["a", "b"], ["hi", "hello"]


def test_scores_come_back_with_the_auth_header_the_config_names(scorer):
    judge = make_reward_fn(RewardConfig(url=_url(scorer), url_api_key="s3cret"))
    assert judge(PROMPTS, RESPONSES) == [2.0, 5.0]
    assert scorer.seen == [{"auth": "Bearer s3cret", "n": 2}]


def test_transient_failures_are_retried_with_back_off(scorer):
    scorer.plan = ["503", "503", "ok"]
    judge = HTTPJudge(_url(scorer), retries=3, backoff_s=0.05)
    assert judge(PROMPTS, RESPONSES) == [2.0, 5.0] and len(scorer.seen) == 3
    scorer.plan, scorer.seen = ["503"], []
    with pytest.raises(RewardEndpointError, match=r"HTTP 503 \(3 tries\)"):
        HTTPJudge(_url(scorer), retries=2, backoff_s=0.01)(PROMPTS, RESPONSES)


def test_a_client_error_is_not_retried(scorer):
    scorer.plan = ["400"]
    with pytest.raises(RewardEndpointError, match="HTTP 400"):
        HTTPJudge(_url(scorer), retries=3, backoff_s=0.01)(PROMPTS, RESPONSES)
    assert len(scorer.seen) == 1


def test_a_slow_drip_cannot_hold_the_deadline(scorer):
    scorer.plan = ["drip"]  # about 6 s for the whole reply, 0.2 s between bytes
    started = time.monotonic()
    with pytest.raises(RewardEndpointError, match="within 1 s"):
        HTTPJudge(_url(scorer), timeout_s=1.0, retries=0)(PROMPTS, RESPONSES)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("kind, message", [
    ("string", "must be a list of finite numbers"), ("bools", "must be a list of finite numbers"),
    ("nan", "must be a list of finite numbers"), ("short", "returned 1 scores for 2 responses"),
    ("huge", "reply longer than 1000000 bytes"),
])
def test_a_malformed_reply_is_refused(scorer, kind, message):
    scorer.plan = [kind]
    with pytest.raises(RewardEndpointError, match=message):
        HTTPJudge(_url(scorer), retries=2, max_reply_bytes=1_000_000, backoff_s=0.01)(PROMPTS, RESPONSES)
    assert len(scorer.seen) == 1  # not retried


def test_credentials_in_the_url_stay_out_of_errors():
    judge = HTTPJudge("http://user:pw123@127.0.0.1:9/score?api_key=k777", timeout_s=1.0, retries=0)
    with pytest.raises(RewardEndpointError) as error:
        judge(PROMPTS, RESPONSES)
    assert "pw123" not in str(error.value) and "k777" not in str(error.value)
