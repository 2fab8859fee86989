"""Notifiers against real servers: an HTTP server and an SMTP server on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from apex_assets.config import load_settings
from apex_assets.lib.alerts import confidence_alert, far_alert
from apex_assets.lib.notify import (
    CompositeNotifier,
    EmailNotifier,
    LogNotifier,
    NotifyError,
    SlackNotifier,
    WebhookNotifier,
    notifier_from_settings,
)

H0 = dt.datetime(2026, 12, 1, 14, 0, tzinfo=dt.UTC)
H1 = dt.datetime(2026, 12, 1, 15, 0, tzinfo=dt.UTC)
FAR_MESSAGE = "FAR 1.52% > 1.00% (3 of 197 defective parts passed) in 2026-12-01 14:00-15:00 UTC"
ALERT_ENV = (
    "APEX_ALERT_WEBHOOK_URL",
    "APEX_ALERT_SLACK_WEBHOOK_URL",
    "APEX_ALERT_EMAIL_TO",
    "APEX_ALERT_EMAIL_FROM",
    "APEX_SMTP_HOST",
    "APEX_SMTP_PORT",
)


@pytest.fixture()
def far_fired():
    return far_alert(3 / 197, 3, 197, threshold=0.01, window_start=H0, window_end=H1)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must reach the test servers, not a proxy from the environment."""
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append(  # type: ignore[attr-defined]
            {"path": self.path, "content_type": self.headers.get("Content-Type"), "body": body}
        )
        status = 500 if self.path.startswith("/fail") else 200
        payload = b"internal error" if status == 500 else b"ok"
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture()
def http_server() -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP server: 200 "ok" on any path, 500 on /fail*; records every POST."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", server.received  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()
    thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Inbox:
    def __init__(self) -> None:
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


@pytest.fixture()
def smtp_server() -> Iterator[tuple[int, _Inbox]]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1."""
    inbox = _Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=_free_port())
    controller.start()
    yield controller.port, inbox
    controller.stop()


# --- single channels -----------------------------------------------------------------------


def test_log_notifier_level_follows_severity(caplog, far_fired):
    caplog.set_level(logging.DEBUG, logger="apex.alerts")
    warning = confidence_alert(0.8, 100, threshold=0.85, window_start=H0, window_end=H1)
    LogNotifier().send(far_fired)
    LogNotifier().send(warning)
    levels = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0] == (
        "apex.alerts",
        logging.CRITICAL,
        f"[CRITICAL] false_accept_rate: {FAR_MESSAGE}",
    )
    assert levels[1][1] == logging.WARNING
    assert levels[1][2].startswith("[WARNING] mean_confidence: mean confidence 0.8000 < 0.85")


def test_webhook_posts_the_alert_json(http_server, far_fired):
    base, received = http_server
    WebhookNotifier(f"{base}/hooks/apex").send(far_fired)
    assert len(received) == 1
    assert received[0]["path"] == "/hooks/apex"
    assert received[0]["content_type"] == "application/json"
    data = json.loads(received[0]["body"])
    assert data == far_fired.to_dict()
    assert data["severity"] == "critical"
    assert data["details"] == {"false_accepts": 3, "defective_parts": 197}


def test_slack_posts_incoming_webhook_text(http_server, far_fired):
    base, received = http_server
    SlackNotifier(f"{base}/services/T000/B000/XXX").send(far_fired)
    assert json.loads(received[0]["body"]) == {
        "text": f":rotating_light: [CRITICAL] false_accept_rate: {FAR_MESSAGE}"
    }


def test_webhook_500_raises(http_server, far_fired):
    base, _ = http_server
    with pytest.raises(NotifyError, match="HTTP 500"):
        WebhookNotifier(f"{base}/fail").send(far_fired)


def test_email_reaches_the_smtp_server(smtp_server, far_fired):
    port, inbox = smtp_server
    EmailNotifier(
        "127.0.0.1", port, "apex@plant.example", ["qa@plant.example", "shift@plant.example"]
    ).send(far_fired)
    assert len(inbox.envelopes) == 1
    envelope = inbox.envelopes[0]
    assert envelope.mail_from == "apex@plant.example"
    assert envelope.rcpt_tos == ["qa@plant.example", "shift@plant.example"]
    msg = message_from_bytes(envelope.content, policy=default_policy)
    assert msg["Subject"] == f"[Apex CRITICAL] false_accept_rate: {FAR_MESSAGE}"
    assert msg["To"] == "qa@plant.example, shift@plant.example"
    assert FAR_MESSAGE in msg.get_content()


def test_constructors_validate():
    with pytest.raises(ValueError, match="http"):
        WebhookNotifier("ftp://example.org/hook")
    with pytest.raises(ValueError, match="recipient"):
        EmailNotifier("127.0.0.1", 25, "apex@plant.example", [])
    with pytest.raises(ValueError, match="port"):
        EmailNotifier("127.0.0.1", 0, "apex@plant.example", ["qa@plant.example"])


# --- the composite -------------------------------------------------------------------------


def test_composite_skips_failing_channels_and_logs_them(caplog, http_server, far_fired):
    caplog.set_level(logging.WARNING, logger="apex.alerts")
    base, received = http_server
    closed_port = _free_port()  # nothing listens there any more
    composite = CompositeNotifier(
        [
            LogNotifier(),
            WebhookNotifier(f"{base}/fail"),
            SlackNotifier(f"http://127.0.0.1:{closed_port}/slack", timeout_s=2.0),
        ]
    )
    assert composite.notify(far_fired) == ["log"]
    assert len(received) == 1  # the 500 server was reached once
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("channel webhook failed" in m and "HTTP 500" in m for m in errors)
    assert any("channel slack failed" in m and "ConnectError" in m for m in errors)


def test_composite_sends_nothing_for_an_alert_that_did_not_fire(caplog, http_server):
    caplog.set_level(logging.DEBUG, logger="apex.alerts")
    base, received = http_server
    quiet = far_alert(0.01, 2, 200, threshold=0.01, window_start=H0, window_end=H1)
    assert CompositeNotifier([LogNotifier(), WebhookNotifier(base)]).notify(quiet) == []
    assert received == []
    assert caplog.records == []


# --- settings ------------------------------------------------------------------------------


def test_from_settings_log_only(monkeypatch):
    for name in ALERT_ENV:
        monkeypatch.delenv(name, raising=False)
    composite = notifier_from_settings(load_settings())
    assert composite.channels == ["log"]


def test_from_settings_all_channels_deliver(monkeypatch, http_server, smtp_server, far_fired):
    base, received = http_server
    port, inbox = smtp_server
    monkeypatch.setenv("APEX_ALERT_WEBHOOK_URL", f"{base}/hook")
    monkeypatch.setenv("APEX_ALERT_SLACK_WEBHOOK_URL", f"{base}/slack")
    monkeypatch.setenv("APEX_ALERT_EMAIL_TO", "qa@plant.example, lead@plant.example")
    monkeypatch.setenv("APEX_ALERT_EMAIL_FROM", "apex@plant.example")
    monkeypatch.setenv("APEX_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("APEX_SMTP_PORT", str(port))
    composite = notifier_from_settings(load_settings())
    assert composite.channels == ["log", "webhook", "slack", "email"]
    assert composite.notify(far_fired) == ["log", "webhook", "slack", "email"]
    assert sorted(r["path"] for r in received) == ["/hook", "/slack"]
    assert inbox.envelopes[0].rcpt_tos == ["qa@plant.example", "lead@plant.example"]
    assert inbox.envelopes[0].mail_from == "apex@plant.example"


def test_from_settings_email_without_smtp_host_names_the_setting(monkeypatch):
    for name in ALERT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APEX_ALERT_EMAIL_TO", "qa@plant.example")
    with pytest.raises(ValueError, match="APEX_SMTP_HOST"):
        notifier_from_settings(load_settings())
